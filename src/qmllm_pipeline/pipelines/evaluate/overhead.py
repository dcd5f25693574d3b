"""Overhead: the wall time of one query per system, and of a refusal (docs/method.md, "Evaluation protocol")."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from qmllm_pipeline.models.clip import decode_images, pixel_values
from qmllm_pipeline.models.guarded import GuardedMLLM, query_seconds

logger = logging.getLogger(__name__)


def overhead(systems: dict[str, GuardedMLLM], eval_neutral: pd.DataFrame, eval_toxic: pd.DataFrame,
             params: dict) -> dict:
    """Median wall time of one query per system on neutral scenes, and for the guarded systems the time of a
    refusal (toxic scenes their guard refuses). `params`: evaluate.overhead."""
    neutral = decode_images(eval_neutral["image"].iloc[: params["queries"]], desc=None)
    toxic = decode_images(eval_toxic["image"], desc=None)
    prompt, new_tokens = params["prompt"], params["max_new_tokens"]
    report = {}
    for name, system in systems.items():
        query_seconds(system, neutral[0], prompt, new_tokens)  # warm-up
        answers = [query_seconds(system, image, prompt, new_tokens) for image in neutral]
        entry = {"answer_median_ms": 1000 * float(np.median(answers)), "queries": len(answers)}
        if system.guard is not None:
            verdicts = system.check_pixels(pixel_values(toxic, system.processor))
            refused = [i for i, v in enumerate(verdicts) if v.refused][: params["queries"]]
            if refused:
                refusals = [query_seconds(system, toxic[i], prompt, new_tokens) for i in refused]
                entry["refusal_median_ms"] = 1000 * float(np.median(refusals))
                entry["refusal_over_answer"] = entry["refusal_median_ms"] / entry["answer_median_ms"]
        report[name] = entry
    base = report["baseline"]["answer_median_ms"]
    for entry in report.values():
        entry["answer_over_baseline"] = entry["answer_median_ms"] / base
    logger.info("overhead (median ms per query): %s", {k: round(v["answer_median_ms"], 1) for k, v in report.items()})
    return report
