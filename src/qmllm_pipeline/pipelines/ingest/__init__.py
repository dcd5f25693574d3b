"""The `ingest` pipeline: the real configuration's data (LLaVA JSON + images, a D_map folder)."""

from qmllm_pipeline.pipelines.ingest.pipeline import create_pipeline

__all__ = ["create_pipeline"]
