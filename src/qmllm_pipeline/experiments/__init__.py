"""Experiments around the pipelines: sweeps that run the pipelines' own nodes under other parameters.
Not pipelines themselves (a sweep trains one model per setting), so run on demand, from `notebooks/`."""
