"""The `features` pipeline: cached vision features and caption targets (`kedro run --pipelines features`)."""

from qmllm_pipeline.pipelines.features.pipeline import create_pipeline

__all__ = ["create_pipeline"]
