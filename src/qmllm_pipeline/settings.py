"""Kedro project settings. kedro-mlflow registers its own hooks through its plugin entry point."""

from kedro.config import OmegaConfigLoader

from qmllm_pipeline.hooks import MlflowRunTagsHook, RunProfileHook, TorchThreadsHook

HOOKS = (TorchThreadsHook(), MlflowRunTagsHook(), RunProfileHook())

CONFIG_LOADER_CLASS = OmegaConfigLoader
CONFIG_LOADER_ARGS = {
    "base_env": "base",
    "default_run_env": "local",
    # Environments (smoke, real) override single keys of base, not whole parameter blocks.
    "merge_strategy": {"parameters": "soft", "catalog": "soft"},
    "config_patterns": {
        "parameters": ["parameters*", "parameters*/**", "**/parameters*"],
    },
}
