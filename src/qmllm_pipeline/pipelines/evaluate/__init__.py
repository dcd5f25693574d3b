"""`evaluate`: toxic-image and gradient jailbreak attacks, utility, overhead and the report."""

from qmllm_pipeline.pipelines.evaluate.pipeline import create_pipeline

__all__ = ["create_pipeline"]
