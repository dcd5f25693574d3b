"""Project hooks: tag every MLflow run so runs compare cleanly in the UI (`pipeline`, `env`)."""

from __future__ import annotations

import mlflow
from kedro.framework.hooks import hook_impl


class MlflowRunTagsHook:
    """kedro-mlflow opens the run in its own `before_pipeline_run`; this one runs after it (trylast)."""

    @hook_impl(trylast=True)
    def before_pipeline_run(self, run_params: dict) -> None:
        if mlflow.active_run() is None:  # tracking disabled for this pipeline
            return
        pipelines = run_params.get("pipeline_names") or [run_params.get("pipeline_name") or "__default__"]
        mlflow.set_tags({"pipeline": ",".join(pipelines), "env": run_params.get("env") or "local"})
