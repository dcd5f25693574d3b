"""Kedro pipelines: thin nodes that call the modules in `world/` and `models/`."""
