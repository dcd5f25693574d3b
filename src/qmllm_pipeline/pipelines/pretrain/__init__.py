"""The `pretrain` pipeline: stage 1 for `qmllm` and the continuous `baseline` (`kedro run --pipelines pretrain`)."""

from qmllm_pipeline.pipelines.pretrain.pipeline import create_pipeline

__all__ = ["create_pipeline"]
