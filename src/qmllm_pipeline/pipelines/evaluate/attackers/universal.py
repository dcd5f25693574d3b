"""Qi et al.'s universal image: PGD with a signed step on one image, optimised on the training harmful
instructions, then used with every held-out one."""

from __future__ import annotations

import logging
import time

import numpy as np
import torch

from qmllm_pipeline.models.attack import JailbreakObjective, target_sequences, universal_pgd
from qmllm_pipeline.pipelines.evaluate.attackers import Crafted
from qmllm_pipeline.pipelines.evaluate.attackers.common import attacked_system, cls_anchor

logger = logging.getLogger(__name__)
KIND = "universal"


def craft(name, spec, systems, instructions, start, settings, budget, seed) -> Crafted:
    system = attacked_system(systems, name, spec)
    params = settings.jailbreak
    train = instructions["train"]
    sequences = target_sequences(system.tokenizer, list(train["instruction"]), list(train["target"]),
                                 params.max_length, params.target_tokens)
    clean = start["image"].float() / 255
    objective = JailbreakObjective(system.model, system.processor, sequences, params.batch_size,
                                   spec.straight_through, spec.continuous_surrogate, cls_anchor(system, spec, clean),
                                   spec.cls_weight)
    started = time.perf_counter()
    image, history = universal_pgd(objective, clean, budget.linf, params.steps, params.step_size / 255, seed,
                                   desc=f"PGD {name} {budget.name}")
    seconds = time.perf_counter() - started
    logger.info("PGD %s %s: %.1f s, loss %.3f -> %.3f, mean |grad| %.2e", name, budget.name, seconds,
                history["loss"][0], history["loss"][-1], float(np.mean(history["grad_abs_mean"])))
    return Crafted((image * 255).round().to(torch.uint8), history, round(seconds, 1))


def summary(crafted: Crafted) -> dict:
    history = crafted.history
    return {"seconds": crafted.seconds, "loss_first": history["loss"][0], "loss_last": history["loss"][-1],
            "grad_abs_mean": float(np.mean(history["grad_abs_mean"]))}
