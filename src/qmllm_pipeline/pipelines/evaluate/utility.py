"""Utility: answers about held-out neutral scenes through each whole system (a guard's refusal counts as a
wrong answer)."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from qmllm_pipeline.models.clip import decode_images
from qmllm_pipeline.models.guarded import GuardedMLLM
from qmllm_pipeline.scoring import questions_without_placeholder, utility_scores

logger = logging.getLogger(__name__)


def utility(systems: dict[str, GuardedMLLM], eval_utility: pd.DataFrame, params: dict, batch_size: int) -> dict:
    """Exact-answer accuracy per question type and the caption word F1, per system. `params`:
    evaluate.utility."""
    images = decode_images(eval_utility["image"], desc=None)
    questions = questions_without_placeholder(eval_utility["question"])
    metrics = {}
    for name, system in systems.items():
        answers = system.respond(images, questions, params["max_new_tokens"], batch_size, desc=f"utility: {name}")
        metrics[name] = {**utility_scores([a.text for a in answers], eval_utility),
                         "refused_by_guard": float(np.mean([a.verdict.refused for a in answers]))}
        logger.info("utility %s: %s, caption F1 %.3f", name, metrics[name]["accuracy"], metrics[name]["caption_f1"])
    return metrics
