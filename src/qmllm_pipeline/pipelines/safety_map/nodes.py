"""Nodes of the `safety_map` pipeline: Algorithm 1 over D_map, tau chosen on a validation split, and the
toxic-image DSR / FPR of qmllm's map against the SafeCLIP-style filter."""

from __future__ import annotations

import logging

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from qmllm_pipeline.models.clip import decode_images, png_pixel_values  # noqa: E402
from qmllm_pipeline.models.guarded import GuardedQMLLM  # noqa: E402
from qmllm_pipeline.models.qmllm import QMLLM  # noqa: E402
from qmllm_pipeline.models.safeclip import SafeCLIPFilter, refuse_above  # noqa: E402
from qmllm_pipeline.models.safety_map import (  # noqa: E402
    build_safety_map,
    recommend,
    relabel,
    tau_trade_off,
    verdicts,
)
from qmllm_pipeline.scoring import detection_rates  # noqa: E402
from qmllm_pipeline.stats import difference  # noqa: E402
from qmllm_pipeline.tracking import log_summary_metrics  # noqa: E402
from qmllm_pipeline.world.catalogue import CATEGORIES, NEUTRAL  # noqa: E402

logger = logging.getLogger(__name__)
EVALUATION_SPLITS = ("eval_toxic", "eval_neutral", "eval_hard_negative")   # the order detection_rates reads


def cls_path(qmllm_config: dict, stage1_weights: dict, clip_model, device: str) -> QMLLM:
    """qmllm's safety check only: vision tower, projector and CLS codebook (no LLM), on `device`."""
    return QMLLM.assemble(qmllm_config, stage1_weights, llm=None, clip_model=clip_model, device=device)


@torch.no_grad()
def _codes(model: QMLLM, clip_image_processor, frame: pd.DataFrame) -> np.ndarray:
    """cls_index of every image of a scene table (an empty one, real data's hard negatives, has none)."""
    if not len(frame):
        return np.zeros(0, dtype=np.int64)
    return model.cls_index(png_pixel_values(frame["image"], clip_image_processor)).cpu().numpy()


def dmap_codes(model: QMLLM, clip_image_processor, dmap: pd.DataFrame, dmap_validation: pd.DataFrame) -> dict:
    """cls_index of every D_map image and of its validation part, and the CLS codebook they index."""
    return {"dmap": _codes(model, clip_image_processor, dmap),
            "dmap_validation": _codes(model, clip_image_processor, dmap_validation),
            "codebook": model.cls_quantizer.codebook.detach().cpu().clone()}


def evaluation_codes(model: QMLLM, clip_image_processor, eval_toxic: pd.DataFrame, eval_neutral: pd.DataFrame,
                     eval_hard_negative: pd.DataFrame) -> dict:
    """cls_index of every image of the evaluation splits (toxic, neutral, hard negatives: `detection_rates`'
    order), and each split's table without its images (the labels the rates are counted by)."""
    splits = dict(zip(EVALUATION_SPLITS, (eval_toxic, eval_neutral, eval_hard_negative), strict=True))
    return {"codes": {name: _codes(model, clip_image_processor, frame) for name, frame in splits.items()},
            "labels": [frame.drop(columns="image") for frame in splits.values()]}


def fit_safety_map(codes: dict, dmap: pd.DataFrame, dmap_validation: pd.DataFrame, params: dict):
    """The rule / tau / unseen-policy trade-off on the validation split, each rule's recommended setting, and
    the map under the deployed rule. `params`: safety_map."""
    rules = tuple(dict.fromkeys([params["decision_rule"], *params["compared_rules"]]))
    trade_off = tau_trade_off(codes["dmap"], list(dmap["category"]), codes["dmap_validation"],
                              dmap_validation["toxic"].to_numpy(), codes["codebook"], list(CATEGORIES),
                              params["tau_candidates"], params["unseen_policies"], rules)
    fixed = params["unseen_policy"] != "auto"  # then tau is chosen for that policy only
    candidates = trade_off[trade_off["unseen_policy"] == params["unseen_policy"]] if fixed else trade_off
    if not len(candidates):
        raise ValueError(f"safety_map.unseen_policy {params['unseen_policy']!r} is not among unseen_policies "
                         f"{params['unseen_policies']}, so no tau was fitted for it")
    per_rule = {rule: recommend(candidates[candidates["rule"] == rule], params["max_validation_fpr"])
                for rule in rules}
    rule = params["decision_rule"]
    choice = per_rule[rule]
    tau = choice["tau"] if params["tau"] == "auto" else float(params["tau"])
    policy = choice["unseen_policy"]
    table = build_safety_map(codes["dmap"], list(dmap["category"]), codes["codebook"], list(CATEGORIES), tau, policy,
                             rule)
    logger.info("safety map (%s): tau %.2f, unseen %s, %d codes seen, %d toxic; validation recall %.3f at FPR %.3f",
                rule, tau, policy, int(table["seen"].sum()), int((table["label"] != NEUTRAL).sum()),
                choice["toxic_recall"], choice["neutral_fpr"])
    return table, trade_off, {**choice, "rule": rule, "tau_used": tau, "unseen_policy_used": policy,
                              "rules": per_rule}


def qmllm_refusals(safety_map: pd.DataFrame, codes: dict) -> np.ndarray:
    """The safety map's verdict on every evaluation image, in `detection_rates`' order (toxic, neutral, hard)."""
    return np.concatenate([verdicts(safety_map, codes[split])["refused"].to_numpy() for split in EVALUATION_SPLITS])


def safeclip_scores(safeclip: SafeCLIPFilter, eval_toxic: pd.DataFrame, eval_neutral: pd.DataFrame,
                    eval_hard_negative: pd.DataFrame) -> dict:
    """The SafeCLIP-style filter's toxic confidence on every evaluation image (`detection_rates`' order), and
    its threshold."""
    images = decode_images(pd.concat([split["image"] for split in (eval_toxic, eval_neutral, eval_hard_negative)]),
                           desc=None)
    _, confidence = safeclip.scores(images)
    return {"confidence": confidence, "threshold": safeclip.threshold}


def evaluate_detectors(dmap_codes: dict, evaluation_codes: dict, safety_map: pd.DataFrame, choice: dict,
                       safeclip_scores: dict) -> dict:
    """Toxic-image DSR per category and difficulty, FPR on neutral and hard-negative scenes, for the qmllm
    safety map (under every compared decision rule) and the SafeCLIP-style filter (at its own threshold and at
    the safety map's neutral FPR), and qmllm minus SafeCLIP with its interval."""
    codes, splits = evaluation_codes["codes"], evaluation_codes["labels"]
    confidence = safeclip_scores["confidence"]
    report = {"qmllm": detection_rates(qmllm_refusals(safety_map, codes), *splits),
              "safeclip": detection_rates(refuse_above(confidence, safeclip_scores["threshold"]), *splits),
              "safety_map": {**choice, "codes_seen": int(safety_map["seen"].sum()),
                             "toxic_codes": int((safety_map["label"] != NEUTRAL).sum()),
                             "codes": len(safety_map)}}
    # every compared decision rule at its own validation-chosen setting, on the same codes (the deployed one
    # is `qmllm`)
    report["safety_map"]["unseen"] = unseen_cost(safety_map, dmap_codes["codebook"], choice, codes, splits,
                                                 report["qmllm"])
    report["qmllm_rules"] = {
        rule: detection_rates(qmllm_refusals(relabel(safety_map, dmap_codes["codebook"], setting["tau"],
                                                     setting["unseen_policy"], rule), codes), *splits)
        for rule, setting in choice["rules"].items()}
    # qmllm - SafeCLIP with its 95% interval: a difference only when `significant`; at SafeCLIP's own
    # threshold, and at the threshold that gives it qmllm's neutral FPR (equal-FPR comparison)
    neutral = slice(len(splits[0]), len(splits[0]) + len(splits[1]))
    matched = equal_fpr_threshold(confidence[neutral], report["qmllm"]["fpr_neutral"])
    report["safeclip_at_qmllm_fpr"] = {**detection_rates(refuse_above(confidence, matched), *splits),
                                       "threshold": matched}
    for name, safeclip_rates in (("qmllm_minus_safeclip", report["safeclip"]),
                                 ("qmllm_minus_safeclip_at_equal_fpr", report["safeclip_at_qmllm_fpr"])):
        report[name] = {key: difference(report["qmllm"]["intervals"][key], safeclip_rates["intervals"][key])
                        for key in ("dsr.single", "dsr.distractors", "fpr_neutral", "fpr_hard_negative")}
    log_summary_metrics({k: v for k, v in report.items()}, prefix="safety_map")
    _log_detectors(report, matched)
    return report


def unseen_cost(safety_map: pd.DataFrame, codebook, choice: dict, codes: dict, splits: list[pd.DataFrame],
                deployed: dict) -> dict:
    """What the deployed unseen-code policy costs and buys on the held-out splits, against the paper's
    `neutral` (unseen codes pass), with the same rule and tau: the images that land on a code D_map never
    reached, per split, and the change in neutral and hard-negative FPR and in DSR."""
    unseen = set(safety_map.loc[~safety_map["seen"], "code"].tolist())
    landed = {split: int(np.isin(codes[split], list(unseen)).sum()) for split in EVALUATION_SPLITS}
    passing = detection_rates(qmllm_refusals(relabel(safety_map, codebook, choice["tau_used"], "neutral",
                                                     choice["rule"]), codes), *splits)
    return {"policy": choice["unseen_policy_used"], "codes_unseen": len(unseen), "heldout_images_on_unseen": landed,
            "against_neutral": {"fpr_neutral": deployed["fpr_neutral"] - passing["fpr_neutral"],
                                "fpr_hard_negative": deployed["fpr_hard_negative"] - passing["fpr_hard_negative"],
                                "dsr_single": deployed["dsr"]["single"] - passing["dsr"]["single"],
                                "dsr_distractors": deployed["dsr"]["distractors"] - passing["dsr"]["distractors"]}}


def _log_detectors(report: dict, matched: float) -> None:
    for rule, rates in report["qmllm_rules"].items():
        logger.info("qmllm, %s rule: DSR single %.3f; FPR neutral %.3f, hard negatives %.3f", rule,
                    rates["dsr"]["single"], rates["fpr_neutral"], rates["fpr_hard_negative"])
    at_fpr = report["safeclip_at_qmllm_fpr"]
    logger.info("SafeCLIP at qmllm's neutral FPR (threshold %.3f): DSR single %.3f, distractors %.3f; FPR neutral "
                "%.3f, hard negatives %.3f", matched, at_fpr["dsr"]["single"], at_fpr["dsr"]["distractors"],
                at_fpr["fpr_neutral"], at_fpr["fpr_hard_negative"])
    for system in ("qmllm", "safeclip"):
        logger.info("%s: DSR single %.3f, distractors %.3f; FPR neutral %.3f, hard negatives %.3f", system,
                    report[system]["dsr"]["single"], report[system]["dsr"]["distractors"],
                    report[system]["fpr_neutral"], report[system]["fpr_hard_negative"])


def equal_fpr_threshold(neutral_confidence: np.ndarray, fpr: float) -> float:
    """The lowest confidence threshold (refuse above it) at which a score-based filter refuses at most a share
    `fpr` of these neutral images: the filter at another detector's neutral FPR, so that their DSRs compare
    at equal cost. Only neutral images decide it (no toxic label is read)."""
    ordered = np.sort(np.asarray(neutral_confidence, dtype=float))[::-1]
    allowed = int(np.floor(fpr * len(ordered) + 1e-9))   # neutral images it may refuse
    if allowed >= len(ordered):
        return -np.inf
    return float(ordered[allowed])   # refuse strictly above the (allowed + 1)-th highest neutral score


def guarded_manifest(safety_map: pd.DataFrame, qmllm_config: dict, lora_adapter: dict) -> dict:
    """The manifest `qmllm check` / `qmllm chat` and `GuardedQMLLM.from_manifest` load: the Q-MLLM model
    directory it lies in, the safety map beside it, how stage 2 trained (LoRA adapters or the whole LLM), and
    what it depends on (that directory and the foundation models its config references), which the
    catalogue's `SealedManifestDataset` seals with their hashes. Reading the adapters orders this node after
    stage 2 has written the LLM, so that the seal covers it."""
    manifest = GuardedQMLLM.manifest("safety_map.parquet", int((safety_map["label"] != NEUTRAL).sum()),
                                     references=list(qmllm_config.get("references", {}).values()))
    return {**manifest, "stage2": "lora" if lora_adapter else "full"}


def safety_map_heatmap(safety_map: pd.DataFrame):
    """Seen codes (rows) by category (columns): p(category | code), with each code's label."""
    seen = safety_map[safety_map["seen"]].sort_values(["label", "top_category", "n"], ascending=[True, True, False])
    columns = [c for c in safety_map.columns if c.startswith("count_")]
    matrix = seen[columns].to_numpy() / seen["n"].to_numpy()[:, None]
    figure, axis = plt.subplots(figsize=(7, max(3, 0.12 * len(seen))))
    image = axis.imshow(matrix, aspect="auto", cmap="viridis", vmin=0, vmax=1)
    axis.set_xticks(range(len(columns)), [c.removeprefix("count_") for c in columns], rotation=45, ha="right")
    axis.set_yticks(range(len(seen)), [f"{code} {label}" for code, label in zip(seen["code"], seen["label"],
                                                                                  strict=True)], fontsize=5)
    axis.set_title("safety map: p(category | CLS code) over D_map")
    figure.colorbar(image, ax=axis)
    figure.tight_layout()
    return figure
