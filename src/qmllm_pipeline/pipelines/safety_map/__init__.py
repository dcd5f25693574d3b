"""The `safety_map` pipeline: Algorithm 1 over D_map and its DSR / FPR (`kedro run --pipelines safety_map`)."""

from qmllm_pipeline.pipelines.safety_map.pipeline import create_pipeline

__all__ = ["create_pipeline"]
