"""Kedro project settings. kedro-mlflow registers its own hooks through its plugin entry point."""

from kedro.config import OmegaConfigLoader

from qmllm_pipeline.hooks import (
    MlflowRunTagsHook,
    MlflowStoreHook,
    RunLockHook,
    RunProfileHook,
    TorchThreadsHook,
)
from qmllm_pipeline.parameters import CONFIG_LOADER_ARGS  # noqa: F401 (Kedro reads it here)

HOOKS = (RunLockHook(), MlflowStoreHook(), TorchThreadsHook(), MlflowRunTagsHook(), RunProfileHook())

CONFIG_LOADER_CLASS = OmegaConfigLoader
