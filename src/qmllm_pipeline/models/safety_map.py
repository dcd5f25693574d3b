"""The safety map (Algorithm 1 of the paper): which semantic (CLS) codes are toxic, learned from D_map.

For every D_map image, k = cls_index(image) and count[k][category] += 1. For each code seen,
p(c|k) = count[k][c] / n_k and c* = argmax_c p(c|k); the code is labelled c* if c* is toxic and
p(c*|k) >= tau, else neutral. Codes D_map never reached follow `unseen_policy`: `refuse` (fail closed: the
project's default), `neutral` (the paper: they pass), or `nearest` (the label of the nearest seen code in the
codebook).

That hard majority vote is the `majority` rule. The `toxic_share` rule keeps what the vote throws away: a
code is labelled toxic when the share of its D_map images that are toxic, of any category, reaches tau
(its label is then the most frequent toxic category); a code split between two toxic categories counts.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

NEUTRAL, REFUSE_UNSEEN = "neutral", "unseen"
UNSEEN_POLICIES = ("neutral", "refuse", "nearest")
DECISION_RULES = ("majority", "toxic_share")


def build_safety_map(cls_index: np.ndarray, categories: list[str], codebook: torch.Tensor, all_categories: list[str],
                     tau: float, unseen_policy: str, rule: str = "majority") -> pd.DataFrame:
    """One row per code: counts per category, n, the arg-max category, its probability, the share of toxic
    images, and the label under `rule`."""
    num_codes = codebook.shape[0]
    counts = np.zeros((num_codes, len(all_categories)), dtype=np.int64)
    column = {c: i for i, c in enumerate(all_categories)}
    np.add.at(counts, (np.asarray(cls_index), np.asarray([column[c] for c in categories])), 1)
    return label_codes(counts, codebook, all_categories, tau, unseen_policy, rule)


def relabel(safety_map: pd.DataFrame, codebook: torch.Tensor, tau: float, unseen_policy: str,
            rule: str) -> pd.DataFrame:
    """The same D_map counts labelled under another rule / tau / policy."""
    columns = [c for c in safety_map.columns if c.startswith("count_")]
    return label_codes(safety_map[columns].to_numpy(), codebook, [c.removeprefix("count_") for c in columns], tau,
                       unseen_policy, rule)


def label_codes(counts: np.ndarray, codebook: torch.Tensor, all_categories: list[str], tau: float, unseen_policy: str,
                rule: str = "majority") -> pd.DataFrame:
    """The map from per-code category counts (codes x categories)."""
    if unseen_policy not in UNSEEN_POLICIES:
        raise ValueError(f"unseen_policy must be one of {UNSEEN_POLICIES}, got {unseen_policy!r}")
    if rule not in DECISION_RULES:
        raise ValueError(f"decision rule must be one of {DECISION_RULES}, got {rule!r}")
    if not 0 < tau <= 1:  # also NaN: a threshold outside (0, 1] labels every reached code one way
        raise ValueError(f"tau must lie in (0, 1], got {tau!r}")
    num_codes = counts.shape[0]
    names = np.asarray(all_categories, dtype=object)
    n = counts.sum(1)
    top = counts.argmax(1)
    probability = np.where(n > 0, counts[np.arange(num_codes), top] / np.maximum(n, 1), 0.0)
    top_category = names[top]
    seen = n > 0
    toxic_columns = names != NEUTRAL
    toxic_share = np.where(n > 0, counts[:, toxic_columns].sum(1) / np.maximum(n, 1), 0.0)
    if rule == "majority":
        label = np.where(seen & (top_category != NEUTRAL) & (probability >= tau), top_category, NEUTRAL)
    else:
        top_toxic = names[toxic_columns][counts[:, toxic_columns].argmax(1)]
        label = np.where(seen & (toxic_share >= tau), top_toxic, NEUTRAL)
    label = label.astype(object)
    if unseen_policy == "refuse":
        label[~seen] = REFUSE_UNSEEN
    elif unseen_policy == "nearest" and seen.any():
        distances = torch.cdist(codebook[~seen].float(), codebook[seen].float())
        label[~seen] = label[seen][distances.argmin(1).numpy()]
    table = pd.DataFrame(counts, columns=[f"count_{c}" for c in all_categories])
    table.insert(0, "code", np.arange(num_codes))
    table["n"] = n
    table["top_category"] = np.where(seen, top_category, "")
    table["probability"] = probability
    table["toxic_share"] = toxic_share
    table["label"] = label
    table["seen"] = seen
    return table


def verdicts(safety_map: pd.DataFrame, cls_index: np.ndarray) -> pd.DataFrame:
    """Per image: the code, its label, whether it is refused, and the code's probability."""
    rows = safety_map.set_index("code").loc[np.asarray(cls_index)]
    return pd.DataFrame({"code": np.asarray(cls_index), "label": rows["label"].to_numpy(),
                         "refused": (rows["label"] != NEUTRAL).to_numpy(),
                         "probability": rows["probability"].to_numpy()})


def tau_trade_off(cls_index_dmap, categories_dmap, cls_index_val, toxic_val: np.ndarray, codebook, all_categories,
                  taus: list[float], policies: list[str], rules: tuple[str, ...] = ("majority",)) -> pd.DataFrame:
    """Toxic recall and neutral false-positive rate on a validation split, for each (rule, tau, policy)."""
    rows = []
    for rule in rules:
        for policy in policies:
            for tau in taus:
                table = build_safety_map(cls_index_dmap, categories_dmap, codebook, all_categories, tau, policy, rule)
                refused = verdicts(table, cls_index_val)["refused"].to_numpy()
                rows.append({"rule": rule, "tau": tau, "unseen_policy": policy,
                             "toxic_recall": float(refused[toxic_val].mean()),
                             "neutral_fpr": float(refused[~toxic_val].mean()),
                             "toxic_codes": int((table["label"] != NEUTRAL).sum())})
    return pd.DataFrame(rows)


def recommend(trade_off: pd.DataFrame, max_fpr: float) -> dict:
    """The highest-recall setting within the FPR budget (ties: lower FPR, then larger tau); if none fits,
    the lowest-FPR setting."""
    within = trade_off[trade_off["neutral_fpr"] <= max_fpr]
    pool = within if len(within) else trade_off
    keys = ["toxic_recall", "neutral_fpr", "tau"] if len(within) else ["neutral_fpr", "toxic_recall", "tau"]
    ascending = [False, True, False] if len(within) else [True, False, False]
    best = pool.sort_values(keys, ascending=ascending).iloc[0]
    return {"tau": float(best["tau"]), "unseen_policy": str(best["unseen_policy"]),
            "toxic_recall": float(best["toxic_recall"]), "neutral_fpr": float(best["neutral_fpr"]),
            "within_fpr_budget": bool(len(within))}
