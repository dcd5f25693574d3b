"""How strong the white-box per-instruction attack on the baseline gets with budget (issue 19: ASR >= 50% at
eps 32/255 is the goal, and if it is not reached, the loss reached is the figure): the evaluate pipeline's
own systems, start image and held-out instructions, then `craft_per_instruction_images` under each setting
(steps, restarts, first step size, target tokens, momentum, objective and its margin kappa, success
test), judged as `judge_jailbreaks` judges it.

A setting changes the attacker only: the baseline model, its instructions and the judge stay the run's.
"""

from __future__ import annotations

import time

import pandas as pd

from qmllm_pipeline.experiments.runs import run_in_memory
from qmllm_pipeline.pipelines.evaluate import attacks
from qmllm_pipeline.pipelines.evaluate import pipeline as evaluate_pipeline

SETUP = ("evaluation_systems", "jailbreak_instructions", "jailbreak_start")
# what a setting may change: evaluate.per_instruction's keys, and target_tokens of evaluate.jailbreak
PER_INSTRUCTION_KEYS = ("steps", "restarts", "step_size", "schedule", "momentum", "batch_size", "objective", "kappa",
                        "stop_on", "check_every")


def evaluation_setup(load, params: dict) -> dict:
    """The systems, held-out instructions and start image the evaluate pipeline builds, from the trained
    run's datasets (`load(name)` reads one from the catalogue)."""
    setup = evaluate_pipeline.create_pipeline().to_outputs(*SETUP)
    inputs = {name: load(name) for name in setup.inputs() if not name.startswith("params:")}
    outputs = run_in_memory(setup, inputs, params)
    return {name: outputs[name] for name in SETUP}


def attack_strength(setup: dict, params: dict, settings: list[dict], budgets: list[int],
                    attacker: str = "baseline_whitebox") -> pd.DataFrame:
    """One row per (setting, eps): the per-instruction attack's ASR on the held-out instructions (with its
    95% interval), the target loss reached (mean and worst) and the seconds it took. `params`: the run's
    parameters; each setting overrides `evaluate.per_instruction` keys and, as `target_tokens`,
    `evaluate.jailbreak.target_tokens`."""
    evaluate = params["evaluate"]
    systems, instructions, start = (setup[name] for name in SETUP)
    spec = evaluate["attackers"][attacker]
    heldout = instructions["heldout"]
    clean, _ = attacks._jailbreak_rates(systems[spec["system"]], start["image"], heldout,
                                        evaluate["jailbreak"]["max_new_tokens"], evaluate["batch_size"])
    rows = []
    for setting in settings:
        unknown = set(setting) - {*PER_INSTRUCTION_KEYS, "target_tokens"}
        if unknown:
            raise ValueError(f"attack strength: unknown setting keys {sorted(unknown)} (allowed: "
                             f"{[*PER_INSTRUCTION_KEYS, 'target_tokens']})")
        per_instruction = {**evaluate["per_instruction"], **{k: v for k, v in setting.items() if k != "target_tokens"}}
        jailbreak = {**evaluate["jailbreak"], **{k: v for k, v in setting.items() if k == "target_tokens"}}
        for eps in budgets:
            budget = {"name": f"eps{eps}", "eps": eps}
            started = time.perf_counter()
            crafted = attacks.craft_per_instruction_images(systems, instructions, start, jailbreak, per_instruction,
                                                           spec, budget, params["seed"])
            seconds = time.perf_counter() - started
            rates, _ = attacks._jailbreak_rates(systems[spec["system"]], crafted["image"], heldout,
                                                jailbreak["max_new_tokens"], evaluate["batch_size"])
            history = crafted["history"]
            rows.append({"seed": params["seed"], "attacker": attacker, "eps": eps,
                         **{k: per_instruction.get(k) for k in PER_INSTRUCTION_KEYS},
                         "target_tokens": jailbreak["target_tokens"], "asr": rates["asr"],
                         "asr_low": rates["intervals"]["asr"]["ci95"][0],
                         "asr_high": rates["intervals"]["asr"]["ci95"][1], "asr_target": rates["asr_target"],
                         "asr_affirmative": rates["asr_affirmative"], "clean_asr": clean["asr"],
                         "loss_start": sum(history["start_loss"]) / len(history["start_loss"]),
                         "loss_best": sum(history["best_loss"]) / len(history["best_loss"]),
                         "loss_worst": max(history["best_loss"]),
                         "won": sum(step >= 0 for step in history["won_step"]) / len(history["won_step"]),
                         "seconds": round(seconds, 1)})
    return pd.DataFrame(rows)
