"""What limits the code-based safety signal (issue 17): the trained CLS path's images read four ways, each
fitted on D_map with its threshold chosen on D_map's validation split at the same FPR budget as Algorithm 1
(`safety_map.max_validation_fpr`), each measured on the same held-out evaluation scenes.

- `codes, majority` / `codes, toxic_share`: the deployed safety map and its compared rule (the pipeline's).
- `kNN, h_cls`: the share of toxic D_map images among the k nearest in the CLS head's continuous output,
  before the codebook: what the head's space knows, with nothing lost to K codes.
- `kNN, CLS feature`: the same on the head's input (CLIP's image embedding on the default path): what the
  vision tower knows, with nothing lost to the head.

If the kNN rows sit far above the code rows, the codebook (K, how D_map fills it, the vote) is the limit;
if they sit at the same level, the feature is. A diagnostic only: the deployed signal stays the code's
(a continuous signal would be a new attack surface).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from qmllm_pipeline.models.clip import png_pixel_values
from qmllm_pipeline.models.qmllm import QMLLM
from qmllm_pipeline.scoring import detection_rates

EVALUATION = ("eval_toxic", "eval_neutral", "eval_hard_negative")


@torch.no_grad()
def cls_views(model: QMLLM, clip_image_processor, images: pd.Series, batch_size: int = 256
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """The CLS feature the head reads and its output h_cls, for every image."""
    features, heads = [], []
    for start in range(0, len(images), batch_size):
        cls_features, _ = model.vision_tower(png_pixel_values(images.iloc[start:start + batch_size],
                                                              clip_image_processor))
        features.append(cls_features)
        heads.append(model.cls_head(cls_features))
    return torch.cat(features), torch.cat(heads)


def knn_toxic_share(query: torch.Tensor, reference: torch.Tensor, reference_toxic: np.ndarray, k: int,
                    metric: str) -> np.ndarray:
    """The share of toxic images among each query's k nearest reference images (L2, or cosine similarity)."""
    if metric == "cosine":
        query, reference = F.normalize(query, dim=-1), F.normalize(reference, dim=-1)
        distance = -(query @ reference.T)
    else:
        distance = torch.cdist(query, reference)
    nearest = distance.topk(k, dim=1, largest=False).indices.numpy()
    return np.asarray(reference_toxic, dtype=float)[nearest].mean(1)


def validation_threshold(scores: np.ndarray, toxic: np.ndarray, max_fpr: float) -> dict:
    """The lowest threshold whose neutral FPR on validation stays within `max_fpr` (the highest recall
    there), refusing when score >= threshold."""
    toxic = np.asarray(toxic, dtype=bool)
    best = {"threshold": float("inf"), "toxic_recall": 0.0, "neutral_fpr": 0.0}
    for threshold in np.unique(scores):
        refused = scores >= threshold
        fpr = float(refused[~toxic].mean())
        if fpr <= max_fpr and float(refused[toxic].mean()) > best["toxic_recall"]:
            best = {"threshold": float(threshold), "toxic_recall": float(refused[toxic].mean()), "neutral_fpr": fpr}
    return best


def signal_limits(model: QMLLM, clip_image_processor, splits: dict[str, pd.DataFrame], safety_metrics: dict,
                  k_values: list[int], max_fpr: float) -> pd.DataFrame:
    """One row per detector (and k): validation recall / FPR, held-out DSR single and among distractors,
    FPR on neutral and hard-negative scenes. `splits`: dmap, dmap_validation and the evaluation splits."""
    views = {name: cls_views(model, clip_image_processor, frame["image"]) for name, frame in splits.items()}
    evaluation = [splits[name] for name in EVALUATION]
    rows = []
    for rule, rates in safety_metrics["qmllm_rules"].items():
        setting = safety_metrics["safety_map"]["rules"][rule]
        rows.append(_row(f"codes, {rule}", None, setting, rates))
    dmap_toxic = splits["dmap"]["toxic"].to_numpy()
    for view, name, metric in ((1, "h_cls", "l2"), (0, "CLS feature", "cosine")):
        for k in k_values:
            scores = {split: knn_toxic_share(views[split][view], views["dmap"][view], dmap_toxic, k, metric)
                      for split in ("dmap_validation", *EVALUATION)}
            setting = validation_threshold(scores["dmap_validation"], splits["dmap_validation"]["toxic"].to_numpy(),
                                           max_fpr)
            refused = np.concatenate([scores[split] >= setting["threshold"] for split in EVALUATION])
            rows.append(_row(f"kNN, {name}", k, setting, detection_rates(refused, *evaluation)))
    return pd.DataFrame(rows)


def _row(detector: str, k: int | None, setting: dict, rates: dict) -> dict:
    return {"detector": detector, "k": k, "validation_recall": setting["toxic_recall"],
            "validation_fpr": setting["neutral_fpr"], "dsr_single": rates["dsr"]["single"],
            "dsr_distractors": rates["dsr"]["distractors"], "fpr_neutral": rates["fpr_neutral"],
            "fpr_hard_negative": rates["fpr_hard_negative"]}
