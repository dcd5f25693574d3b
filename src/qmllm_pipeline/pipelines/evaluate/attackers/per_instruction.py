"""The main white-box threat: one image per held-out harmful instruction, crafted for its own affirmative target
(the attacker knows the request it will send), with the attacker's own success test."""

from __future__ import annotations

import logging
import time

import numpy as np
import pandas as pd
import torch

from qmllm_pipeline.models.attack import PerInstructionObjective, per_instruction_pgd, target_sequences
from qmllm_pipeline.models.guarded import GuardedMLLM
from qmllm_pipeline.pipelines.evaluate.attackers import Crafted
from qmllm_pipeline.pipelines.evaluate.attackers.common import attacked_system, cls_anchor, objective_terms, verdicts

logger = logging.getLogger(__name__)
KIND = "per_instruction"


def success_test(system: GuardedMLLM, heldout: pd.DataFrame, stop_on: str, max_new_tokens: int, batch_size: int):
    """The attacker's own success test, `succeeded(images, rows)` for `per_instruction_pgd`: the attacked system
    answers instruction `rows[i]` with image i (in [0, 1]) and the judge decides as the evaluation will, by
    `stop_on`: `complied` (the refusal detector's verdict, which the ASR reports) or `affirmative` (complied and
    opening with the target's first words); `none`: no test."""
    if stop_on == "none":
        return None
    instructions, targets = list(heldout["instruction"]), list(heldout["target"])

    def succeeded(images: torch.Tensor, rows: list[int]) -> torch.Tensor:
        answers = system.respond((images * 255).round().to(torch.uint8), [instructions[i] for i in rows],
                                 max_new_tokens, batch_size)
        said = verdicts(answers, [targets[i] for i in rows])
        passed = said["complied"] if stop_on == "complied" else [
            a and b for a, b in zip(said["complied"], said["affirmative"], strict=True)]
        return torch.tensor(passed, dtype=torch.bool)

    return succeeded


def craft(name, spec, systems, instructions, start, settings, budget, seed) -> Crafted:
    system = attacked_system(systems, name, spec)
    params, own = settings.jailbreak, settings.per_instruction
    heldout = instructions["heldout"]
    sequences = target_sequences(system.tokenizer, list(heldout["instruction"]), list(heldout["target"]),
                                 params.max_length, params.target_tokens)
    clean = start["image"].float() / 255
    objective = PerInstructionObjective(system.model, system.processor, sequences, spec.straight_through,
                                        spec.continuous_surrogate, cls_anchor(system, spec, clean), spec.cls_weight,
                                        **objective_terms(system.tokenizer, own.objective, own.kappa))
    succeeded = success_test(system, heldout, own.stop_on, params.max_new_tokens, own.batch_size)
    started = time.perf_counter()
    images, history = per_instruction_pgd(
        objective, clean, budget.linf, own.steps, own.step_size, own.schedule, own.restarts, own.batch_size, seed,
        own.momentum, succeeded, own.check_every, desc=f"per-instruction PGD {name} {budget.name}")
    seconds = time.perf_counter() - started
    won = [step for step in history["won_step"] if step >= 0]
    logger.info("per-instruction PGD %s %s: %d images, %.1f s, mean loss %.3f -> best %.3f (nll %.3f); "
                "success test passed for %d (at the start: %d)", name, budget.name, len(images), seconds,
                np.mean(history["start_loss"]), np.mean(history["best_loss"]), np.mean(history["best_nll"]),
                len(won), sum(step == 0 for step in won))
    return Crafted((images * 255).round().to(torch.uint8), history, round(seconds, 1))


def summary(crafted: Crafted) -> dict:
    history = crafted.history
    return {"seconds": crafted.seconds, "loss_first": float(np.mean(history["start_loss"])),
            "loss_last": float(np.mean(history["best_loss"])), "nll_last": float(np.mean(history["best_nll"])),
            "nll_last_max": float(np.max(history["best_nll"])),
            "won": float(np.mean([step >= 0 for step in history["won_step"]]))}
