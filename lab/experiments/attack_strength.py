"""How strong a per-instruction attacker (white-box on the baseline by default) gets with budget: the evaluate
pipeline's own systems, start image and held-out instructions, then the attacker's crafting
(`attackers.craft`) under each setting (steps, restarts, first step size, target tokens, momentum, objective
and its margin kappa, success test), judged as `attacks.jailbreak_budget` judges it.

A setting changes the attacker only: the baseline model, its instructions and the judge stay the run's.
"""

from __future__ import annotations

import time

import pandas as pd

from qmllm_pipeline.dotted import with_overrides
from qmllm_pipeline.in_memory import run_in_memory
from qmllm_pipeline.models.params import parse
from qmllm_pipeline.pipelines.evaluate import attackers, attacks, bound
from qmllm_pipeline.pipelines.evaluate import pipeline as evaluate_pipeline
from qmllm_pipeline.pipelines.evaluate.settings import Budget, EvaluateSettings

SETUP = ("evaluation_systems", "jailbreak_instructions", "jailbreak_start")
# what a setting may change: evaluate.per_instruction's keys, and target_tokens of evaluate.jailbreak
PER_INSTRUCTION_KEYS = ("steps", "restarts", "step_size", "schedule", "momentum", "batch_size", "objective", "kappa",
                        "stop_on", "check_every")


def evaluation_setup(load, params: dict) -> dict:
    """The systems, held-out instructions and start image the evaluate pipeline builds, from the trained
    run's datasets (`load(name)` reads one from the catalogue)."""
    setup = evaluate_pipeline.create_pipeline(params).to_outputs(*SETUP)
    inputs = {name: load(name) for name in setup.inputs() if not name.startswith("params:")}
    outputs = run_in_memory(setup, inputs, params)
    return {name: outputs[name] for name in SETUP}


def attack_strength(setup: dict, params: dict, settings: list[dict], budgets: list[int],
                    attacker: str = "baseline_whitebox_per_instruction") -> pd.DataFrame:
    """One row per (setting, eps): a per-instruction attacker's ASR on the held-out instructions of its own
    system (with its 95% interval), the target loss reached (mean and worst) and the seconds it took.
    `params`: the run's parameters; each setting overrides `evaluate.per_instruction` keys and, as
    `target_tokens`, `evaluate.jailbreak.target_tokens`."""
    systems, instructions, start = (setup[name] for name in SETUP)
    configured = parse(EvaluateSettings, params["evaluate"], "evaluate")
    spec = configured.attackers[attacker]
    heldout = instructions["heldout"]
    clean, _ = attacks.jailbreak_rates(systems[spec.system], start["image"], heldout,
                                       configured.jailbreak.max_new_tokens, configured.batch_size)
    rows = []
    for setting in settings:
        unknown = set(setting) - {*PER_INSTRUCTION_KEYS, "target_tokens"}
        if unknown:
            raise ValueError(f"attack strength: unknown setting keys {sorted(unknown)} (allowed: "
                             f"{[*PER_INSTRUCTION_KEYS, 'target_tokens']})")
        overrides = {(f"jailbreak.{k}" if k == "target_tokens" else f"per_instruction.{k}"): v
                     for k, v in setting.items()}
        evaluate = parse(EvaluateSettings, with_overrides(params["evaluate"], **overrides), "evaluate")
        for eps in budgets:
            started = time.perf_counter()
            crafted = attackers.craft(attacker, spec, systems, instructions, start, evaluate,
                                      Budget(f"eps{eps}", eps), params["seed"])
            seconds = time.perf_counter() - started
            rates, _ = attacks.jailbreak_rates(systems[spec.system], crafted.image, heldout,
                                               evaluate.jailbreak.max_new_tokens, evaluate.batch_size)
            history = crafted.history
            rows.append({"seed": params["seed"], "attacker": attacker, "eps": eps,
                         **{k: getattr(evaluate.per_instruction, k) for k in PER_INSTRUCTION_KEYS},
                         "target_tokens": evaluate.jailbreak.target_tokens, "asr": rates["asr"],
                         "asr_low": rates["intervals"]["asr"]["ci95"][0],
                         "asr_high": rates["intervals"]["asr"]["ci95"][1], "asr_target": rates["asr_target"],
                         "asr_affirmative": rates["asr_affirmative"], "clean_asr": clean["asr"],
                         "loss_start": sum(history["start_loss"]) / len(history["start_loss"]),
                         "loss_best": sum(history["best_loss"]) / len(history["best_loss"]),
                         "loss_worst": max(history["best_loss"]),
                         "won": sum(step >= 0 for step in history["won_step"]) / len(history["won_step"]),
                         "seconds": round(seconds, 1)})
    return pd.DataFrame(rows)


# what a code-space search setting may change: evaluate.code_search's keys (the start is always the clean codes)
CODE_SEARCH_KEYS = ("instructions", "names", "sweeps", "beam_width", "candidates", "batch_size", "objective", "kappa")


def search_strength(setup: dict, params: dict, settings: list[dict]) -> pd.DataFrame:
    """One row per setting: the code-space search on qmllm (`code_space_bound`) with `evaluate.code_search` keys
    overridden, begun from the clean image's codes only (no image attack is run here, so `start_from_attacks`
    is off): its ASR on the held-out instructions (found or clean codes comply, with the 95% interval), the
    target loss from the clean codes to the found ones (mean and worst) and the seconds it took. A stronger
    search (`candidates: null`, every code at every position; a wider beam; more sweeps) tells whether a zero
    bound is the model's or the default search's."""
    evaluate = params["evaluate"]
    systems, instructions, start = (setup[name] for name in SETUP)
    rows = []
    for setting in settings:
        unknown = set(setting) - set(CODE_SEARCH_KEYS)
        if unknown:
            raise ValueError(f"search strength: unknown setting keys {sorted(unknown)} "
                             f"(allowed: {list(CODE_SEARCH_KEYS)})")
        search = {**evaluate["code_search"], **setting, "start_from_attacks": False}
        summary, _ = bound.code_space_bound(systems, instructions, start, {**evaluate, "code_search": search},
                                            params["seed"], [])
        interval = summary["intervals"]["asr_with_clean"]["ci95"]
        rows.append({"seed": params["seed"], **{k: search.get(k) for k in CODE_SEARCH_KEYS},
                     "start_from_attacks": search["start_from_attacks"],
                     "asr": summary["asr_with_clean"], "asr_low": interval[0], "asr_high": interval[1],
                     "asr_found": summary["asr"], "loss_start": summary["loss_first"],
                     "loss_best": summary["loss_last"], "loss_worst": summary["loss_last_max"],
                     "seconds": summary["seconds"]})
    return pd.DataFrame(rows)
