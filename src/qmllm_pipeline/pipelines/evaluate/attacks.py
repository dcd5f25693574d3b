"""The attacks of docs/method.md's evaluation on the three systems: the toxic image with a benign prompt, and the
gradient jailbreak by every attacker (`evaluate.attackers`, crafted by `attackers/`) at every budget, judged on
held-out harmful instructions against the clean image and against random noise of the same budget; and how
stable Q-MLLM's codes are under noise. The code-space bound is `bound.py`."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import torch

from qmllm_pipeline.judge import RefusalPhraseJudge
from qmllm_pipeline.models.attack import random_sign_noise
from qmllm_pipeline.models.clip import decode_images, pixel_values
from qmllm_pipeline.models.guarded import GuardedMLLM
from qmllm_pipeline.models.params import parse
from qmllm_pipeline.pipelines.evaluate import attackers
from qmllm_pipeline.pipelines.evaluate.attackers.common import verdicts
from qmllm_pipeline.pipelines.evaluate.settings import Budget, EvaluateSettings
from qmllm_pipeline.scoring import detection_rates
from qmllm_pipeline.stats import rate

logger = logging.getLogger(__name__)


def toxic_image_attack(systems: dict[str, GuardedMLLM], eval_toxic: pd.DataFrame, eval_neutral: pd.DataFrame,
                       eval_hard_negative: pd.DataFrame, params: dict, batch_size: int) -> tuple[pd.DataFrame, dict]:
    """Attack 1: every held-out toxic, neutral and hard-negative scene with a benign prompt. A response
    defends when it is a refusal (by the guard, or by the LLM in the judge's eyes). `params`:
    evaluate.toxic_image."""
    judge = RefusalPhraseJudge()
    scenes = pd.concat([eval_toxic.assign(split="toxic"), eval_neutral.assign(split="neutral"),
                        eval_hard_negative.assign(split="hard_negative")], ignore_index=True)
    images = decode_images(scenes["image"], desc=None)
    phrasings = params["prompts"]
    prompts = [phrasings[i % len(phrasings)] for i in range(len(scenes))]
    frames, metrics = [], {}
    for name, system in systems.items():
        answers = system.respond(images, prompts, params["max_new_tokens"], batch_size,
                                 desc=f"toxic-image attack: {name}")
        refused = np.asarray([a.verdict.refused or judge.is_refusal(a.text) for a in answers])
        metrics[name] = detection_rates(refused, eval_toxic, eval_neutral, eval_hard_negative)
        metrics[name]["refused_by_guard_share"] = float(np.mean([a.verdict.refused for a in answers]))
        frames.append(pd.DataFrame({
            "system": name, "split": scenes["split"], "scene_id": scenes["scene_id"],
            "category": scenes["category"], "difficulty": scenes["difficulty"], "prompt": prompts,
            "refused": refused, "refused_by_guard": [a.verdict.refused for a in answers],
            "answer": [a.text for a in answers]}))
        logger.info("toxic-image attack %s: DSR single %.3f, distractors %.3f; FPR neutral %.3f, hard %.3f", name,
                    metrics[name]["dsr"]["single"], metrics[name]["dsr"]["distractors"],
                    metrics[name]["fpr_neutral"], metrics[name]["fpr_hard_negative"])
    return pd.concat(frames, ignore_index=True), metrics


def jailbreak_start(systems: dict[str, GuardedMLLM], eval_neutral: pd.DataFrame, start_rank: int) -> dict:
    """The clean image the jailbreak starts from: the `start_rank`-th held-out neutral scene that every guard
    lets through (an attacker starts from an image the defense accepts)."""
    images = decode_images(eval_neutral["image"], desc=None)
    accepted = np.ones(len(images), dtype=bool)
    for system in systems.values():
        pixels = pixel_values(images, system.processor)
        accepted &= ~np.asarray([v.refused for v in system.check_pixels(pixels)])
    if not accepted.any():
        raise ValueError("every held-out neutral scene is refused by a guard: no clean start for the jailbreak")
    index = int(np.flatnonzero(accepted)[start_rank % int(accepted.sum())])
    logger.info("jailbreak start image: eval_neutral row %d (%s)", index, eval_neutral["scene_id"].iloc[index])
    return {"image": images[index], "scene_id": str(eval_neutral["scene_id"].iloc[index])}


def jailbreak_instructions(text_corpus: pd.DataFrame, params: dict, seed: int) -> dict[str, pd.DataFrame]:
    """The harmful instructions the image is optimised on (training split) and judged on (held out), each cut
    to the configured number by a seeded draw. `params`: evaluate.jailbreak."""
    def draw(split: str, limit: int | None) -> pd.DataFrame:
        frame = text_corpus[(text_corpus["kind"] == "harmful") & (text_corpus["split"] == split)]
        return frame.sample(n=min(limit, len(frame)), random_state=seed) if limit else frame

    return {"train": draw("train", params["train_instructions"]),
            "heldout": draw("heldout", params["heldout_instructions"])}


def jailbreak_rates(system: GuardedMLLM, image: torch.Tensor, heldout: pd.DataFrame, max_new_tokens: int,
                     batch_size: int, clean: torch.Tensor | None = None) -> tuple[dict, dict]:
    """One image (3, H, W) with every held-out harmful instruction, or one image per instruction (n, 3, H, W):
    attack success by the refusal detector (not a refusal) and by 'target string in response'; for Q-MLLM
    also how many patch codes (and name picks) the image moved (the mean over images). Returns the rates and
    the per-instruction detail: `complied` (n,) and, for Q-MLLM with `clean`, the patch codes each
    instruction's image gave the LLM (n lists of N) and its name picks (n lists of S, with a name head),
    which the code-space bound starts from."""
    images = image[None].expand(len(heldout), -1, -1, -1) if image.dim() == 3 else image
    answers = system.respond(images, list(heldout["instruction"]), max_new_tokens, batch_size)
    said = verdicts(answers, list(heldout["target"]))
    complied, on_target, affirmative = said["complied"], said["on_target"], said["affirmative"]
    n = len(answers)
    rates = {"asr": float(np.mean(complied)), "asr_target": float(np.mean(on_target)),
             "asr_affirmative": float(np.mean(affirmative)),
             "dsr": 1.0 - float(np.mean(complied)),
             "guard_refused_share": float(np.mean([a.verdict.refused for a in answers])),
             "example": answers[complied.index(True) if any(complied) else 0].text,
             "intervals": {"asr": rate(sum(complied), n), "asr_target": rate(sum(on_target), n),
                           "asr_affirmative": rate(sum(affirmative), n), "dsr": rate(n - sum(complied), n)}}
    detail = {"complied": complied}
    if clean is not None:
        distinct = images[:1] if image.dim() == 3 else images
        rates["linf"] = int((distinct.int() - clean.int()).abs().max())
        if system.model.quantized:
            with torch.no_grad():
                both = system.model.encode_images(pixel_values(torch.cat([clean[None], distinct]), system.processor))
            patches = both.patches.indices
            rates["patch_codes_changed"] = float((patches[1:] != patches[:1]).sum(1).float().mean())
            rates["patch_codes"] = int(patches.shape[1])
            rates["cls_code_changed"] = float((both.cls.indices[1:] != both.cls.indices[0]).float().mean())
            rates["clean_cls_code"] = int(both.cls.indices[0])
            detail["patch_codes"] = patches[1:].expand(n, -1).tolist()
            if both.name_picks is not None:  # the names the image hands the LLM, flipped by the perturbation
                rates["name_picks_changed"] = float((both.name_picks[1:] != both.name_picks[:1]).sum(1).float().mean())
                detail["name_picks"] = both.name_picks[1:].expand(n, -1).tolist()
    return rates, detail


def jailbreak_budget(systems: dict[str, GuardedMLLM], instructions: dict, start: dict, params: dict,
                     budget: dict, seed: int) -> dict:
    """Every attacker's images at one budget (`attackers.craft`), each judged on the held-out harmful
    instructions by every case it names: the attacked system, and the systems its images transfer to, each
    through the real (hard-quantized) model. `params`: evaluate. `instruction_detail` holds, for each case on
    a quantized system, which instructions complied and the codes each one's image gave the LLM (for
    `code_space_bound`)."""
    settings = parse(EvaluateSettings, params, "evaluate")
    budget = parse(Budget, budget, f"evaluate.budgets.{budget.get('name')}")
    crafted = {name: attackers.craft(name, spec, systems, instructions, start, settings, budget, seed)
               for name, spec in settings.attackers.items()}
    results, detail = {}, {}
    for name, spec in settings.attackers.items():
        for case, judged in spec.cases.items():
            rates, detail[case] = jailbreak_rates(systems[judged.system], crafted[name].image, instructions["heldout"],
                                                  settings.jailbreak.max_new_tokens, settings.batch_size,
                                                  start["image"])
            results[case] = {"system": judged.system, **rates}
            logger.info("jailbreak %s %s: ASR %.3f (target %.3f)", budget.name, case, results[case]["asr"],
                        results[case]["asr_target"])
    quantized = {case for case, (_, judged) in settings.cases().items() if systems[judged.system].model.quantized}
    return {"budget": budget.name, "eps": budget.eps, "results": results,
            "instruction_detail": {case: d for case, d in detail.items() if case in quantized},
            "images": {name: c.image for name, c in crafted.items() if c.image.dim() == 3},
            "instruction_images": {name: c.image for name, c in crafted.items() if c.image.dim() == 4},
            "pgd": {name: stats for name, spec in settings.attackers.items()
                    if (stats := attackers.summary(name, spec, crafted[name]))}}


def collect_jailbreaks(*budgets: dict) -> list[dict]:
    """The judged jailbreaks of every budget, in the order of `evaluate.budgets`."""
    return list(budgets)


def judge_clean_image(systems: dict[str, GuardedMLLM], instructions: dict, start: dict, params: dict,
                      batch_size: int) -> dict:
    """Every system with the clean start image: the rate each attack is measured against."""
    return {name: jailbreak_rates(system, start["image"], instructions["heldout"], params["max_new_tokens"],
                                  batch_size)[0] for name, system in systems.items()}


def code_stability(systems: dict[str, GuardedMLLM], eval_neutral: pd.DataFrame, budgets: dict, params: dict,
                   seed: int) -> dict:
    """For each budget, the share of Q-MLLM's patch codes and of its CLS codes (and name picks) left unchanged
    when `params["images"]` held-out neutral scenes get random +-eps noise (`random_sign_noise`, the
    jailbreak's control; uniform noise when unconstrained). `params`: evaluate.code_stability."""
    model = systems["qmllm"].model
    processor = systems["qmllm"].processor
    images = decode_images(eval_neutral["image"].head(params["images"]), desc=None)
    with torch.no_grad():
        clean = model.encode_images(pixel_values(images, processor))
        out = {}
        for budget in budgets.values():
            eps = parse(Budget, budget, f"evaluate.budgets.{budget.get('name')}").linf
            noisy = torch.stack([(random_sign_noise(image.float() / 255, eps, seed + i) * 255).round()
                                 .to(torch.uint8) for i, image in enumerate(images)])
            moved = model.encode_images(pixel_values(noisy, processor))
            entry = {"patch_codes_unchanged": float((moved.patches.indices == clean.patches.indices).float().mean()),
                     "cls_code_unchanged": float((moved.cls.indices == clean.cls.indices).float().mean())}
            if clean.name_picks is not None:
                entry["name_picks_unchanged"] = float((moved.name_picks == clean.name_picks).float().mean())
            out[budget["name"]] = entry
            logger.info("code stability %s: patch codes unchanged %.3f, CLS code unchanged %.3f", budget["name"],
                        entry["patch_codes_unchanged"], entry["cls_code_unchanged"])
    return {"images": len(images), "budgets": out}
