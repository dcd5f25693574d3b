"""The `finetune` pipeline: stage 2 for `qmllm` and `baseline`, and their utility (`kedro run --pipelines finetune`)."""

from qmllm_pipeline.pipelines.finetune.pipeline import create_pipeline

__all__ = ["create_pipeline"]
