"""Algorithm 1 (the safety map), its tau trade-off, and the pipeline's DSR / FPR report on the smoke world."""

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

from qmllm_pipeline.models.safety_map import build_safety_map, recommend, tau_trade_off, verdicts
from qmllm_pipeline.pipelines.safety_map.nodes import equal_fpr_threshold

CATEGORIES = ["weapon", "drugs", "neutral"]
# code 0: 3 weapon + 1 neutral (p=.75); code 1: 2 drugs + 2 neutral (p=.5, tie -> first max: drugs);
# code 2: 5 neutral; code 3: never seen
CODES = np.array([0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 2])
LABELS = ["weapon"] * 3 + ["neutral"] + ["drugs"] * 2 + ["neutral"] * 2 + ["neutral"] * 5
CODEBOOK = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [0.1, 0.1]])  # code 3 sits next to code 0


def test_algorithm_1_counts_probabilities_and_threshold():
    table = build_safety_map(CODES, LABELS, CODEBOOK, CATEGORIES, tau=0.6, unseen_policy="neutral")
    assert table.loc[0, ["count_weapon", "count_drugs", "count_neutral", "n"]].tolist() == [3, 0, 1, 4]
    assert table.loc[0, "probability"] == pytest.approx(0.75) and table.loc[0, "label"] == "weapon"
    assert table.loc[1, "top_category"] == "drugs" and table.loc[1, "label"] == "neutral"  # 0.5 < tau
    assert table.loc[2, "label"] == "neutral" and not table.loc[3, "seen"]
    lower = build_safety_map(CODES, LABELS, CODEBOOK, CATEGORIES, tau=0.5, unseen_policy="neutral")
    assert lower.loc[1, "label"] == "drugs"


@pytest.mark.parametrize(("policy", "label"), [("neutral", "neutral"), ("refuse", "unseen"), ("nearest", "weapon")])
def test_unseen_code_policies(policy, label):
    table = build_safety_map(CODES, LABELS, CODEBOOK, CATEGORIES, tau=0.6, unseen_policy=policy)
    assert table.loc[3, "label"] == label
    assert verdicts(table, np.array([3]))["refused"].item() == (label != "neutral")
    with pytest.raises(ValueError, match="unseen_policy"):
        build_safety_map(CODES, LABELS, CODEBOOK, CATEGORIES, tau=0.6, unseen_policy="maybe")


def test_tau_trade_off_and_recommendation():
    validation = np.array([0, 0, 1, 2, 2, 3])
    toxic = np.array([True, True, True, False, False, True])
    trade = tau_trade_off(CODES, LABELS, validation, toxic, CODEBOOK, CATEGORIES, [0.5, 0.6], ["neutral", "nearest"])
    row = trade[(trade["tau"] == 0.5) & (trade["unseen_policy"] == "nearest")].iloc[0]
    assert row["toxic_recall"] == 1.0 and row["neutral_fpr"] == 0.0
    best = recommend(trade, max_fpr=0.05)
    assert best == {"tau": 0.5, "unseen_policy": "nearest", "toxic_recall": 1.0, "neutral_fpr": 0.0,
                    "within_fpr_budget": True}


def test_equal_fpr_threshold_refuses_at_most_the_allowed_share_of_neutral_scores():
    scores = np.array([0.9, 0.8, 0.8, 0.5, 0.1])
    assert equal_fpr_threshold(scores, 0.0) == 0.9          # refuse above the highest: none
    assert equal_fpr_threshold(scores, 0.2) == 0.8          # one may pass, but 0.8 twice: only 0.9 refused
    assert (scores > equal_fpr_threshold(scores, 0.2)).sum() == 1
    assert (scores > equal_fpr_threshold(scores, 0.6)).sum() == 3
    assert equal_fpr_threshold(scores, 1.0) == -np.inf


def test_pipeline_reports_both_detectors(stages):
    report = stages["safety_metrics"]
    for system in ("qmllm", "safeclip"):
        assert set(report[system]["dsr"]) == {"single", "distractors"}
        assert set(report[system]["dsr_per_category"]["single"]) == {
            "weapon", "alcohol", "tobacco", "blood", "insulting_gesture", "drugs"}
        for value in (report[system]["fpr_neutral"], report[system]["fpr_hard_negative"]):
            assert 0.0 <= value <= 1.0
    matched = report["safeclip_at_qmllm_fpr"]   # SafeCLIP at qmllm's neutral FPR: never above it
    assert matched["fpr_neutral"] <= report["qmllm"]["fpr_neutral"] + 1e-9
    assert report["qmllm_minus_safeclip_at_equal_fpr"]["dsr.single"]["value"] == pytest.approx(
        report["qmllm"]["dsr"]["single"] - matched["dsr"]["single"])
    table = stages["safety_map"]
    assert len(table) == report["safety_map"]["codes"] and table["n"].sum() == len(stages["dmap_codes"]["dmap"])
    assert isinstance(stages["safety_map_heatmap"], Figure)
    assert len(stages["tau_trade_off"]) == 7 * 3 * 2   # taus x unseen policies x compared rules
    unseen = report["safety_map"]["unseen"]   # the fail-closed default and what it costs against the paper's
    assert unseen["policy"] == report["safety_map"]["unseen_policy_used"] == "refuse"
    assert unseen["codes_unseen"] == int((~table["seen"]).sum()) == int((table["label"] == "unseen").sum())
    assert unseen["against_neutral"]["fpr_neutral"] >= 0 and unseen["against_neutral"]["dsr_single"] >= 0


@pytest.mark.parametrize("tau", [0.0, -0.1, 1.5, float("nan")])
def test_a_threshold_outside_its_range_is_refused(tau):
    with pytest.raises(ValueError, match="tau must lie in"):
        build_safety_map(CODES, LABELS, CODEBOOK, CATEGORIES, tau=tau, unseen_policy="refuse")


def test_a_score_that_cannot_be_read_refuses_and_a_threshold_outside_its_range_is_refused():
    from qmllm_pipeline.models.safeclip import SafeCLIPFilter, refuse_above

    assert refuse_above(np.array([0.2, 0.7, np.nan, 0.6]), 0.6).tolist() == [False, True, True, False]
    for threshold in (1.0, -0.1, float("nan")):
        with pytest.raises(ValueError, match="SafeCLIP threshold must lie in"):
            SafeCLIPFilter(None, None, None, {}, threshold=threshold)
