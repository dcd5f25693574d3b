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

from qmllm_pipeline.models.clip import decode_images, pixel_values  # noqa: E402
from qmllm_pipeline.models.safeclip import SafeCLIPFilter  # noqa: E402
from qmllm_pipeline.models.safety_map import build_safety_map, recommend, tau_trade_off, verdicts  # noqa: E402
from qmllm_pipeline.models.vision import VisionTower  # noqa: E402
from qmllm_pipeline.pipelines.pretrain.nodes import build_qmllm, load_stage1_state  # noqa: E402
from qmllm_pipeline.tracking import log_summary_metrics  # noqa: E402
from qmllm_pipeline.world.catalogue import CATEGORIES, NEUTRAL  # noqa: E402
from qmllm_pipeline.world.scenes import zero_shot_prompts  # noqa: E402

logger = logging.getLogger(__name__)
SPLITS = ("dmap", "dmap_validation", "eval_toxic", "eval_neutral", "eval_hard_negative")


@torch.no_grad()
def cls_codes(dmap, dmap_validation, eval_toxic, eval_neutral, eval_hard_negative, clip_model, clip_image_processor,
              tokenizer, llm, stage1_weights: dict, pretrain_params: dict, feature_params: dict) -> dict:
    """cls_index of every image of D_map, its validation part and the evaluation splits (qmllm's model)."""
    torch.set_num_threads(feature_params["threads"])
    tower = VisionTower.from_clip(clip_model, select_layer=feature_params["select_layer"],
                                  cls_source=feature_params["cls_source"]).eval()
    model = load_stage1_state(build_qmllm(llm, tokenizer, pretrain_params, True, tower.hidden_size), stage1_weights)
    codes = {}
    for name, frame in zip(SPLITS, (dmap, dmap_validation, eval_toxic, eval_neutral, eval_hard_negative), strict=True):
        pixels = pixel_values(decode_images(frame["image"], desc=None), clip_image_processor)
        cls_features, _ = tower(pixels)
        codes[name] = model.cls_quantizer.nearest(model.mm_projector(cls_features)).numpy()
    codes["codebook"] = model.cls_quantizer.codebook.detach().clone()
    return codes


def fit_safety_map(codes: dict, dmap: pd.DataFrame, dmap_validation: pd.DataFrame, params: dict):
    """The tau / unseen-policy trade-off on the validation split, the recommended setting, and the map."""
    trade_off = tau_trade_off(codes["dmap"], list(dmap["category"]), codes["dmap_validation"],
                              dmap_validation["toxic"].to_numpy(), codes["codebook"], list(CATEGORIES),
                              params["tau_candidates"], params["unseen_policies"])
    choice = recommend(trade_off, params["max_validation_fpr"])
    tau = choice["tau"] if params["tau"] == "auto" else float(params["tau"])
    policy = choice["unseen_policy"] if params["unseen_policy"] == "auto" else params["unseen_policy"]
    table = build_safety_map(codes["dmap"], list(dmap["category"]), codes["codebook"], list(CATEGORIES), tau, policy)
    logger.info("safety map: tau %.2f, unseen %s, %d codes seen, %d toxic; validation recall %.3f at FPR %.3f",
                tau, policy, int(table["seen"].sum()), int((table["label"] != NEUTRAL).sum()),
                choice["toxic_recall"], choice["neutral_fpr"])
    return table, trade_off, {**choice, "tau_used": tau, "unseen_policy_used": policy}


def qmllm_refusals(safety_map: pd.DataFrame, codes: dict) -> np.ndarray:
    """The safety map's verdict on every evaluation image, in `detection_rates`' order (toxic, neutral, hard)."""
    return np.concatenate([verdicts(safety_map, codes[split])["refused"].to_numpy()
                           for split in ("eval_toxic", "eval_neutral", "eval_hard_negative")])


def detection_rates(refused: np.ndarray, eval_toxic, eval_neutral, eval_hard_negative) -> dict:
    n_toxic = len(eval_toxic)
    toxic, neutral, hard = refused[:n_toxic], refused[n_toxic:n_toxic + len(eval_neutral)], \
        refused[n_toxic + len(eval_neutral):]
    frame = eval_toxic.assign(refused=toxic)
    return {
        "dsr": {level: float(frame.loc[frame["difficulty"] == level, "refused"].mean())
                for level in ("single", "distractors")},
        "dsr_per_category": {level: {c: float(v) for c, v in
                                     frame[frame["difficulty"] == level].groupby("category")["refused"].mean().items()}
                             for level in ("single", "distractors")},
        "fpr_neutral": float(neutral.mean()), "fpr_hard_negative": float(hard.mean()),
    }


def build_safeclip_filter(clip_model, tokenizer, clip_image_processor, emoji_catalogue: pd.DataFrame,
                          threshold: float, data_params: dict, text_side: str) -> SafeCLIPFilter:
    """The SafeCLIP-style filter with one class per catalogue item, prompted in the style CLIP was trained on."""
    backgrounds = sorted(data_params["layout"]["backgrounds"])
    descriptions = {c: [zero_shot_prompts(name, backgrounds, text_side)
                        for name in emoji_catalogue.loc[emoji_catalogue["category"] == c, "name"]]
                    for c in CATEGORIES}
    return SafeCLIPFilter(clip_model, tokenizer, clip_image_processor, descriptions, threshold)


def evaluate_detectors(codes: dict, safety_map: pd.DataFrame, choice: dict, eval_toxic, eval_neutral,
                       eval_hard_negative, clip_model, clip_image_processor, tokenizer, emoji_catalogue,
                       params: dict, data_params: dict, clip_text_side: str) -> dict:
    """Toxic-image DSR per category and difficulty, FPR on neutral and hard-negative scenes, for the qmllm
    safety map and the SafeCLIP-style filter."""
    qmllm = qmllm_refusals(safety_map, codes)
    safeclip = build_safeclip_filter(clip_model, tokenizer, clip_image_processor, emoji_catalogue,
                                     params["safeclip_threshold"], data_params, clip_text_side)
    images = decode_images(pd.concat([eval_toxic["image"], eval_neutral["image"], eval_hard_negative["image"]]),
                           desc=None)
    report = {"qmllm": detection_rates(qmllm, eval_toxic, eval_neutral, eval_hard_negative),
              "safeclip": detection_rates(safeclip.refused(images), eval_toxic, eval_neutral, eval_hard_negative),
              "safety_map": {**choice, "codes_seen": int(safety_map["seen"].sum()),
                             "toxic_codes": int((safety_map["label"] != NEUTRAL).sum()),
                             "codes": len(safety_map)}}
    log_summary_metrics({k: v for k, v in report.items()}, prefix="safety_map")
    for system in ("qmllm", "safeclip"):
        logger.info("%s: DSR single %.3f, distractors %.3f; FPR neutral %.3f, hard negatives %.3f", system,
                    report[system]["dsr"]["single"], report[system]["dsr"]["distractors"],
                    report[system]["fpr_neutral"], report[system]["fpr_hard_negative"])
    return report


def guarded_manifest(safety_map: pd.DataFrame, pretrain_params: dict, feature_params: dict, params: dict) -> dict:
    """The manifest `qmllm check` / `qmllm chat` and `GuardedQMLLM.from_manifest` load: where the trained
    artifacts are (relative to the manifest) and how to rebuild the model around them."""
    return {"artifacts": params["guarded_model"]["artifacts"],
            "config": {"select_layer": feature_params["select_layer"], "cls_source": feature_params["cls_source"],
                       "projector": pretrain_params["projector"]["type"],
                       "layernorm": pretrain_params["projector"]["layernorm"],
                       "cls_codes": pretrain_params["codebooks"]["cls_codes"],
                       "patch_codes": pretrain_params["codebooks"]["patch_codes"],
                       "toxic_codes": int((safety_map["label"] != NEUTRAL).sum())}}


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
