"""The `foundation` pipeline: the embedded world's tokenizer, CLIP and aligned LLM."""

from qmllm_pipeline.pipelines.foundation.pipeline import create_pipeline

__all__ = ["create_pipeline"]
