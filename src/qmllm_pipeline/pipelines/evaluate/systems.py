"""The three evaluated systems (docs/method.md, "Evaluation protocol"), assembled from what the pipelines saved:
`baseline` (the continuous model), `safeclip` (baseline behind the CLIP filter) and `qmllm` (behind its safety
map)."""

from __future__ import annotations

import pandas as pd

from qmllm_pipeline.models.guarded import GuardedMLLM, evaluation_systems
from qmllm_pipeline.models.qmllm import QMLLM
from qmllm_pipeline.models.safeclip import SafeCLIPFilter


def frozen_model(qmllm_config: dict, stage1_weights: dict, finetuned_llm, clip_model, device: str) -> QMLLM:
    """One trained variant, frozen, reading images through CLIP's vision tower, on `device`."""
    return QMLLM.assemble(qmllm_config, stage1_weights, finetuned_llm, clip_model, device)


def assemble_systems(baseline: QMLLM, qmllm: QMLLM, tokenizer, clip_image_processor, safety_map: pd.DataFrame,
                     safeclip: SafeCLIPFilter) -> dict[str, GuardedMLLM]:
    return evaluation_systems(baseline, qmllm, tokenizer, clip_image_processor, safety_map, safeclip)
