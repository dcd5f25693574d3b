"""The three evaluated systems (DESIGN.md section 2), assembled from what the pipelines saved: `baseline`
(the continuous model), `safeclip` (baseline behind the CLIP filter) and `qmllm` (behind its safety map)."""

from __future__ import annotations

import pandas as pd

from qmllm_pipeline.models.guarded import GuardedMLLM, evaluation_systems
from qmllm_pipeline.models.qmllm import QMLLM
from qmllm_pipeline.models.safeclip import SafeCLIPFilter
from qmllm_pipeline.world.scenes import category_prompts


def frozen_model(qmllm_config: dict, stage1_weights: dict, finetuned_llm, clip_model) -> QMLLM:
    """One trained variant, frozen, reading images through CLIP's vision tower."""
    return QMLLM.assemble(qmllm_config, stage1_weights, finetuned_llm, clip_model)


def safeclip_guard(clip_model, clip_tokenizer, clip_image_processor, emoji_catalogue: pd.DataFrame, backgrounds: dict,
                   text_side: str, threshold: float) -> SafeCLIPFilter:
    """The SafeCLIP-style filter: one class per catalogue item, prompted in the style CLIP was trained on."""
    return SafeCLIPFilter(clip_model, clip_tokenizer, clip_image_processor,
                          category_prompts(emoji_catalogue, list(backgrounds), text_side), threshold)


def assemble_systems(baseline: QMLLM, qmllm: QMLLM, tokenizer, clip_image_processor, safety_map: pd.DataFrame,
                     safeclip: SafeCLIPFilter) -> dict[str, GuardedMLLM]:
    return evaluation_systems(baseline, qmllm, tokenizer, clip_image_processor, safety_map, safeclip)
