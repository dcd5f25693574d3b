"""The `data` pipeline: render the embedded emoji world (`kedro run --pipelines data`)."""

from qmllm_pipeline.pipelines.data.pipeline import create_pipeline

__all__ = ["create_pipeline"]
