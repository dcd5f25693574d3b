"""Nodes of the `evaluate` pipeline: three systems trained by the pipeline (`baseline`, `safeclip`, `qmllm`)
under the toxic-image attack and the gradient jailbreak (white-box, plain, transfer, adaptive), their
utility and their time per query; then the report (metrics JSON, Markdown table, plots, images)."""

from __future__ import annotations

import logging
import time
from collections import Counter

import numpy as np
import pandas as pd
import torch

from qmllm_pipeline.judge import RefusalPhraseJudge
from qmllm_pipeline.models.attack import JailbreakObjective, random_sign_noise, universal_pgd
from qmllm_pipeline.models.clip import decode_images, pixel_values
from qmllm_pipeline.models.guarded import GuardedMLLM, SafeCLIPGuard, SafetyMapGuard
from qmllm_pipeline.models.tokenizer import IMAGE_TOKEN, encode_chat
from qmllm_pipeline.models.vision import VisionTower
from qmllm_pipeline.pipelines.finetune.nodes import normalise_answer
from qmllm_pipeline.pipelines.pretrain.nodes import build_qmllm, load_stage1_state
from qmllm_pipeline.pipelines.safety_map.nodes import build_safeclip_filter, detection_rates

logger = logging.getLogger(__name__)
SYSTEMS = ("baseline", "safeclip", "qmllm")


def assemble_systems(tokenizer, clip_model, clip_image_processor, qmllm_llm, qmllm_weights: dict, baseline_llm,
                     baseline_weights: dict, safety_map: pd.DataFrame, emoji_catalogue: pd.DataFrame,
                     pretrain_params: dict, feature_params: dict, safety_map_params: dict, data_params: dict,
                     clip_text_side: str, params: dict) -> dict[str, GuardedMLLM]:
    """The three systems, frozen, sharing one vision tower; `safeclip` is `baseline` behind the CLIP filter."""
    torch.set_num_threads(params["threads"])
    tower = VisionTower.from_clip(clip_model, select_layer=feature_params["select_layer"],
                                  cls_source=feature_params["cls_source"])

    def frozen(llm, weights: dict, quantized: bool):
        model = load_stage1_state(build_qmllm(llm, tokenizer, pretrain_params, quantized, tower.hidden_size), weights)
        model.vision_tower = tower
        return model.requires_grad_(False).eval()

    baseline = frozen(baseline_llm, baseline_weights, quantized=False)
    safeclip = build_safeclip_filter(clip_model, tokenizer, clip_image_processor, emoji_catalogue,
                                     safety_map_params["safeclip_threshold"], data_params, clip_text_side)
    return {"baseline": GuardedMLLM(baseline, tokenizer, clip_image_processor),
            "safeclip": GuardedMLLM(baseline, tokenizer, clip_image_processor, SafeCLIPGuard(safeclip)),
            "qmllm": GuardedMLLM(frozen(qmllm_llm, qmllm_weights, quantized=True), tokenizer, clip_image_processor,
                                 SafetyMapGuard(safety_map))}


def systems_from_catalog(catalog, params: dict) -> dict[str, GuardedMLLM]:
    """`assemble_systems` from a Kedro catalogue and parameters (`qmllm bench`, the notebook)."""
    load = catalog.load
    return assemble_systems(
        load("tokenizer"), load("clip_model"), load("clip_image_processor"), load("qmllm.finetuned_llm"),
        load("qmllm.stage1_weights"), load("baseline.finetuned_llm"), load("baseline.stage1_weights"),
        load("safety_map"), load("emoji_catalogue"), params["pretrain"], params["features"], params["safety_map"],
        params["data"], params["foundation"]["clip"]["text_side"], params["evaluate"])


def toxic_image_attack(systems: dict, eval_toxic: pd.DataFrame, eval_neutral: pd.DataFrame,
                       eval_hard_negative: pd.DataFrame, params: dict) -> tuple[pd.DataFrame, dict]:
    """Attack 1: every held-out toxic, neutral and hard-negative scene with a benign prompt. A response
    defends when it is a refusal (by the guard, or by the LLM in the judge's eyes)."""
    settings = params["toxic_image"]
    judge = RefusalPhraseJudge()
    scenes = pd.concat([eval_toxic.assign(split="toxic"), eval_neutral.assign(split="neutral"),
                        eval_hard_negative.assign(split="hard_negative")], ignore_index=True)
    images = decode_images(scenes["image"], desc=None)
    phrasings = settings["prompts"]
    prompts = [phrasings[i % len(phrasings)] for i in range(len(scenes))]
    frames, metrics = [], {}
    for name, system in systems.items():
        answers = system.respond(images, prompts, settings["max_new_tokens"], params["batch_size"],
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


def token_f1(prediction: str, reference: str) -> float:
    """Word-overlap F1 (SQuAD-style) of a caption against the reference caption."""
    predicted, truth = normalise_answer(prediction).split(), normalise_answer(reference).split()
    common = sum((Counter(predicted) & Counter(truth)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(truth)
    return 2 * precision * recall / (precision + recall)


def utility(systems: dict, eval_utility: pd.DataFrame, params: dict) -> dict:
    """Exact-answer accuracy per question type on held-out neutral scenes and the caption word F1, through
    each whole system (a guard's refusal counts as a wrong answer)."""
    images = decode_images(eval_utility["image"], desc=None)
    questions = [q.removeprefix(f"{IMAGE_TOKEN}\n") for q in eval_utility["question"]]
    kinds = eval_utility["question_type"].to_numpy()
    metrics = {}
    for name, system in systems.items():
        answers = system.respond(images, questions, params["utility"]["max_new_tokens"], params["batch_size"],
                           desc=f"utility: {name}")
        texts = [a.text for a in answers]
        correct = np.asarray([normalise_answer(t) == normalise_answer(r)
                              for t, r in zip(texts, eval_utility["answer"], strict=True)])
        captions = kinds == "caption"
        metrics[name] = {
            "accuracy": {str(k): float(correct[kinds == k].mean()) for k in sorted(set(kinds))},
            "caption_f1": float(np.mean([token_f1(t, r) for t, r, c in
                                         zip(texts, eval_utility["answer"], captions, strict=True) if c])),
            "refused_by_guard": float(np.mean([a.verdict.refused for a in answers])),
        }
        logger.info("utility %s: %s, caption F1 %.3f", name, metrics[name]["accuracy"], metrics[name]["caption_f1"])
    return metrics


def jailbreak_start(systems: dict, eval_neutral: pd.DataFrame, params: dict) -> dict:
    """The clean image the jailbreak starts from: the first held-out neutral scene that every guard lets
    through (an attacker starts from an image the defense accepts)."""
    images = decode_images(eval_neutral["image"], desc=None)
    accepted = np.ones(len(images), dtype=bool)
    for system in systems.values():
        pixels = pixel_values(images, system.processor)
        accepted &= ~np.asarray([v.refused for v in system.check_pixels(pixels)])
    if not accepted.any():
        raise ValueError("every held-out neutral scene is refused by a guard: no clean start for the jailbreak")
    index = int(np.flatnonzero(accepted)[params["jailbreak"]["start_rank"] % int(accepted.sum())])
    logger.info("jailbreak start image: eval_neutral row %d (%s)", index, eval_neutral["scene_id"].iloc[index])
    return {"image": images[index], "scene_id": str(eval_neutral["scene_id"].iloc[index])}


def _harmful(text_corpus: pd.DataFrame, split: str, limit: int | None, seed: int) -> pd.DataFrame:
    frame = text_corpus[(text_corpus["kind"] == "harmful") & (text_corpus["split"] == split)]
    return frame.sample(n=min(limit, len(frame)), random_state=seed) if limit else frame


def craft_jailbreak_image(systems: dict, text_corpus: pd.DataFrame, start: dict, params: dict, attacker: dict,
                          budget: dict) -> dict:
    """PGD for one (attacker, budget): a universal image optimised on the training harmful instructions."""
    torch.set_num_threads(params["threads"])
    settings = params["jailbreak"]
    if attacker["system"] not in systems:
        raise ValueError(f"attacker {attacker['name']}: unknown system {attacker['system']!r} (one of {list(systems)})")
    system = systems[attacker["system"]]
    if attacker["cls_weight"] > 0 and not isinstance(system.guard, SafetyMapGuard):
        raise ValueError(f"attacker {attacker['name']}: cls_weight needs a system with a safety map (qmllm)")
    model, tokenizer = system.model, system.tokenizer
    train = _harmful(text_corpus, "train", settings["train_instructions"], settings["seed"])
    sequences = [_first_target_tokens(*encode_chat(
        tokenizer, [{"role": "user", "content": f"{IMAGE_TOKEN}\n{row.instruction}"},
                    {"role": "assistant", "content": row.target}], settings["max_length"]), settings["target_tokens"])
        for row in train.itertuples(index=False)]
    clean = start["image"].float() / 255
    anchor = _neutral_anchor(system, clean) if attacker["cls_weight"] > 0 else None
    objective = JailbreakObjective(model, system.processor, sequences, settings["batch_size"],
                                   attacker["straight_through"], attacker.get("continuous_surrogate", False),
                                   anchor, attacker["cls_weight"])
    started = time.perf_counter()
    image, history = universal_pgd(objective, clean, _eps(budget), settings["steps"], settings["step_size"] / 255,
                                   settings["seed"], desc=f"PGD {attacker['name']} {budget['name']}")
    seconds = time.perf_counter() - started
    logger.info("PGD %s %s: %.1f s, loss %.3f -> %.3f, mean |grad| %.2e", attacker["name"], budget["name"], seconds,
                history["loss"][0], history["loss"][-1], float(np.mean(history["grad_abs_mean"])))
    return {"image": (image * 255).round().to(torch.uint8), "history": history, "seconds": round(seconds, 1),
            "attacker": attacker["name"], "budget": budget["name"], "eps": budget["eps"]}


def _eps(budget: dict) -> float | None:
    """A budget's L_inf bound on the [0, 1] pixel scale (parameters give it in 1/255); None: unconstrained."""
    return None if budget["eps"] is None else budget["eps"] / 255


def _first_target_tokens(ids: list[int], labels: list[int], keep: int | None) -> tuple[list[int], list[int]]:
    """Keep the loss on the first `keep` target tokens only (the affirmative opening, "Sure, here is"):
    the tokens that decide whether the model complies or refuses."""
    if keep is None:
        return ids, labels
    kept, out = 0, []
    for label in labels:
        kept += label != -100
        out.append(label if label != -100 and kept <= keep else -100)
    return ids, out


@torch.no_grad()
def _neutral_anchor(system: GuardedMLLM, clean: torch.Tensor) -> torch.Tensor:
    """The neutral-labelled CLS code nearest to the clean image's projected CLS: where the adaptive attacker
    keeps its image so the safety map lets it through."""
    neutral = torch.tensor(system.guard.neutral_codes)
    uint8 = (clean[None] * 255).round().to(torch.uint8)
    h_cls = system.model.encode_images(pixel_values(uint8, system.processor)).h_cls
    codebook = system.model.cls_quantizer.codebook.detach()[neutral]
    return codebook[(codebook - h_cls).pow(2).sum(1).argmin()].clone()


def _jailbreak_rates(system: GuardedMLLM, image: torch.Tensor, heldout: pd.DataFrame, params: dict,
                     clean: torch.Tensor | None = None) -> dict:
    """One image with every held-out harmful instruction: attack success by the refusal detector (not a
    refusal) and by 'target string in response'; for Q-MLLM also how many patch codes the image moved."""
    judge = RefusalPhraseJudge()
    settings = params["jailbreak"]
    images = image[None].expand(len(heldout), -1, -1, -1)
    answers = system.respond(images, list(heldout["instruction"]), settings["max_new_tokens"], params["batch_size"])
    complied = [not (a.verdict.refused or judge.is_refusal(a.text)) for a in answers]
    on_target = [judge.contains_target(a.text, t) for a, t in zip(answers, heldout["target"], strict=True)]
    affirmative = [judge.contains_target(a.text, " ".join(t.split()[:3]))
                   for a, t in zip(answers, heldout["target"], strict=True)]
    rates = {"asr": float(np.mean(complied)), "asr_target": float(np.mean(on_target)),
             "asr_affirmative": float(np.mean(affirmative)),
             "dsr": 1.0 - float(np.mean(complied)), "guard_refused": bool(answers[0].verdict.refused),
             "example": answers[complied.index(True) if any(complied) else 0].text}
    if clean is not None:
        rates["linf"] = int((image.int() - clean.int()).abs().max())
        if system.model.quantized:
            with torch.no_grad():
                both = system.model.encode_images(pixel_values(torch.stack([clean, image]), system.processor))
            patches = both.patches.indices
            rates["patch_codes_changed"] = int((patches[0] != patches[1]).sum())
            rates["patch_codes"] = int(patches.shape[1])
            rates["cls_code"], rates["clean_cls_code"] = int(both.cls.indices[1]), int(both.cls.indices[0])
    return rates


def judge_jailbreaks(systems: dict, text_corpus: pd.DataFrame, start: dict, baseline_whitebox: dict,
                     qmllm_plain: dict, qmllm_adaptive: dict, qmllm_surrogate: dict, params: dict,
                     budget: dict) -> dict:
    """The images of one budget against the held-out harmful instructions: white-box on baseline (and the
    same image on safeclip), and on qmllm the plain, transfer (baseline's image), adaptive (BPDA) and
    continuous-surrogate attacks, each checked through the real hard-quantized model; and random +-eps
    noise on both models, the control that tells an attack from a perturbation of that size."""
    torch.set_num_threads(params["threads"])
    heldout = _harmful(text_corpus, "heldout", params["jailbreak"]["heldout_instructions"], params["jailbreak"]["seed"])
    noise = {"image": (random_sign_noise(start["image"].float() / 255, _eps(budget), params["jailbreak"]["seed"]) * 255)
             .round().to(torch.uint8)}
    cases = {"baseline_whitebox": ("baseline", baseline_whitebox), "safeclip_whitebox": ("safeclip", baseline_whitebox),
             "baseline_noise": ("baseline", noise),
             "qmllm_plain": ("qmllm", qmllm_plain), "qmllm_transfer": ("qmllm", baseline_whitebox),
             "qmllm_adaptive": ("qmllm", qmllm_adaptive), "qmllm_surrogate": ("qmllm", qmllm_surrogate),
             "qmllm_noise": ("qmllm", noise)}
    results = {}
    for case, (system, crafted) in cases.items():
        results[case] = {"system": system, **_jailbreak_rates(systems[system], crafted["image"], heldout, params,
                                                              start["image"])}
        logger.info("jailbreak %s %s: ASR %.3f (target %.3f)", budget["name"], case, results[case]["asr"],
                    results[case]["asr_target"])
    crafted = {"baseline_whitebox": baseline_whitebox, "qmllm_plain": qmllm_plain, "qmllm_adaptive": qmllm_adaptive,
               "qmllm_surrogate": qmllm_surrogate}
    return {"budget": budget["name"], "eps": budget["eps"], "results": results,
            "images": {**{name: c["image"] for name, c in crafted.items()}, "qmllm_noise": noise["image"]},
            "pgd": {name: {"seconds": c["seconds"], "loss_first": c["history"]["loss"][0],
                           "loss_last": c["history"]["loss"][-1],
                           "grad_abs_mean": float(np.mean(c["history"]["grad_abs_mean"]))}
                    for name, c in crafted.items()}}


def judge_clean_image(systems: dict, text_corpus: pd.DataFrame, start: dict, params: dict) -> dict:
    """Every system with the clean start image: the rate each attack is measured against."""
    torch.set_num_threads(params["threads"])
    heldout = _harmful(text_corpus, "heldout", params["jailbreak"]["heldout_instructions"], params["jailbreak"]["seed"])
    return {name: _jailbreak_rates(system, start["image"], heldout, params) for name, system in systems.items()}


def overhead(systems: dict, eval_neutral: pd.DataFrame, eval_toxic: pd.DataFrame, params: dict) -> dict:
    """Median wall time of one query (batch 1: pixels -> verdict -> answer) per system on neutral scenes,
    and for the guarded systems the time of a refusal (toxic scenes their guard refuses)."""
    torch.set_num_threads(params["threads"])
    settings = params["overhead"]
    neutral = decode_images(eval_neutral["image"].iloc[: settings["queries"]], desc=None)
    toxic = decode_images(eval_toxic["image"], desc=None)
    prompt = settings["prompt"]

    def timed(system, image) -> float:
        started = time.perf_counter()
        system.respond(image[None], [prompt], settings["max_new_tokens"], 1)
        return time.perf_counter() - started

    report = {}
    for name, system in systems.items():
        timed(system, neutral[0])  # warm-up
        answers = [timed(system, image) for image in neutral]
        entry = {"answer_median_ms": 1000 * float(np.median(answers)), "queries": len(answers)}
        if system.guard is not None:
            verdicts = system.check_pixels(pixel_values(toxic, system.processor))
            refused = [i for i, v in enumerate(verdicts) if v.refused][: settings["queries"]]
            if refused:
                refusals = [timed(system, toxic[i]) for i in refused]
                entry["refusal_median_ms"] = 1000 * float(np.median(refusals))
                entry["refusal_over_answer"] = entry["refusal_median_ms"] / entry["answer_median_ms"]
        report[name] = entry
    base = report["baseline"]["answer_median_ms"]
    for entry in report.values():
        entry["answer_over_baseline"] = entry["answer_median_ms"] / base
    logger.info("overhead (median ms per query): %s",
                {k: round(v["answer_median_ms"], 1) for k, v in report.items()})
    return report
