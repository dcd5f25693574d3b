"""The `evaluate` pipeline on the smoke models (run in memory with a DataCatalog)."""

import pytest
import torch

from qmllm_pipeline.models.attack import random_sign_noise
from qmllm_pipeline.models.params import parse
from qmllm_pipeline.parameters import load_parameters
from qmllm_pipeline.pipelines.evaluate.settings import EvaluateSettings

SETTINGS = parse(EvaluateSettings, load_parameters("smoke")["evaluate"], "evaluate")
BUDGETS = tuple(SETTINGS.budgets)
PER_INSTRUCTION_ATTACKERS = tuple(name for name, spec in SETTINGS.attackers.items() if spec.kind == "per_instruction")


def test_every_system_and_budget_is_measured(evaluation):
    metrics = evaluation["evaluation_metrics"]
    assert set(metrics["summary"]) == {"baseline", "safeclip", "qmllm"}
    for row in metrics["summary"].values():
        assert all(0.0 <= v <= 1.0 for k, v in row.items() if k not in ("ms_per_query", "intervals")), row
        assert row["ms_per_query"] > 0
        for key, interval in row["intervals"].items():  # every rate with its count and 95% interval
            low, high = interval["ci95"]
            assert interval["value"] == pytest.approx(row[key]) and low <= row[key] <= high, key
            assert interval["count"] == round(row[key] * interval["n"]), key
    gains = metrics["qmllm_gain_intervals"]
    assert set(gains) == set(BUDGETS) and all(isinstance(g["attack"]["significant"], bool) for g in gains.values())
    assert set(metrics["jailbreak"]) == set(BUDGETS)
    for entry in metrics["jailbreak"].values():
        assert set(SETTINGS.cases()) <= set(entry)
    # the continuous baseline has no guard: every refusal it makes comes from its LLM
    assert metrics["toxic_image"]["baseline"]["refused_by_guard_share"] == 0.0
    assert metrics["utility"]["baseline"]["refused_by_guard"] == 0.0


def test_adversarial_images_respect_their_budgets(evaluation, smoke_params):
    start = evaluation["jailbreak_start"]["image"].int()
    images = evaluation["adversarial_images"]
    budgets = smoke_params["evaluate"]["budgets"]
    # one entry per attacker (the noise control's and the per-instruction attackers' among them) and budget
    assert len(images) == len(BUDGETS) * len(SETTINGS.attackers)
    heldout = len(evaluation["jailbreak_instructions"]["heldout"])
    for key, image in images.items():
        budget, attacker = key.split("/")
        shape = (heldout, *start.shape) if attacker.endswith("_per_instruction") else start.shape
        assert image.dtype == torch.uint8 and image.shape == shape, key
        eps = budgets[budget]["eps"]
        if eps is not None:
            assert (image.int() - start).abs().max() <= eps, key
            if attacker == "qmllm_plain":  # the deployed Q-MLLM passes no gradient: PGD cannot move
                assert torch.equal(image.int(), start), key
            if attacker == "noise":  # every pixel the clamp leaves free moves by exactly eps
                free = (start >= eps) & (start <= 255 - eps)
                assert ((image.int() - start).abs()[free] == eps).all(), key


def test_random_sign_noise_spends_the_budget_at_random():
    start = torch.full((3, 8, 8), 128 / 255)  # on the 8-bit grid, as every start image is
    noisy = random_sign_noise(start, 16 / 255, seed=1)
    moved = ((noisy - start) * 255).round().abs()
    assert torch.equal(moved, torch.full_like(moved, 16.0))
    assert 0.3 < (noisy > start).float().mean() < 0.7  # both directions
    assert torch.equal(noisy, random_sign_noise(start, 16 / 255, seed=1))  # seeded
    unconstrained = random_sign_noise(start, None, seed=1)
    assert unconstrained.min() >= 0 and unconstrained.max() <= 1 and unconstrained.std() > 0.2


def test_the_report_has_the_paper_style_tables(evaluation):
    report = evaluation["evaluation_report"]
    for heading in ("| system | toxic DSR single", "## Jailbreak by attacker", "## Time per query"):
        assert heading in report
    assert report.count("| qmllm |") >= 6  # main table, four jailbreak attackers, the noise control
    assert "| qmllm | random noise |" in report and "| baseline | random noise |" in report
    assert set(evaluation["evaluation_metrics"]["qmllm_noise_gain_over_clean"]) == set(BUDGETS)
    responses = evaluation["toxic_image_responses"]
    assert set(responses["system"]) == {"baseline", "safeclip", "qmllm"}
    assert responses.loc[responses["refused_by_guard"], "refused"].all()


def test_code_stability_is_measured_per_budget(evaluation, smoke_params):
    stability = evaluation["evaluation_metrics"]["code_stability"]
    assert stability["images"] == smoke_params["evaluate"]["code_stability"]["images"]
    assert set(stability["budgets"]) == set(BUDGETS)
    for entry in stability["budgets"].values():
        assert 0.0 <= entry["patch_codes_unchanged"] <= 1.0 and 0.0 <= entry["cls_code_unchanged"] <= 1.0
    budgets = stability["budgets"]  # a larger budget leaves no more patch codes in place (more noise)
    assert budgets["eps16"]["patch_codes_unchanged"] >= budgets["eps64"]["patch_codes_unchanged"]
    assert "Q-MLLM code stability" in evaluation["evaluation_report"]


def test_per_instruction_attacks_are_judged_and_their_loss_reported(evaluation):
    for budget in BUDGETS:
        entry = evaluation["evaluation_metrics"]["jailbreak"][budget]
        for case in ("baseline_per_instruction", "qmllm_transfer_per_instruction", "qmllm_adaptive_per_instruction"):
            assert 0.0 <= entry[case]["asr"] <= 1.0, (budget, case)
        for name in PER_INSTRUCTION_ATTACKERS:
            pgd = entry["pgd"][name]
            assert pgd["loss_last"] <= pgd["loss_first"] + 1e-6 and pgd["nll_last"] <= pgd["nll_last_max"]
            # an image that passed the attacker's success test is judged again, in another batch: it complies
            judged = entry[next(iter(SETTINGS.attackers[name].cases))]
            assert 0.0 <= pgd["won"] <= judged["asr"] + 0.05, (budget, name)
    assert "Per-instruction PGD" in evaluation["evaluation_report"]


def test_an_unknown_per_instruction_success_test_is_refused_naming_the_key(smoke_params):
    import pandas as pd

    from qmllm_pipeline.dotted import with_overrides
    from qmllm_pipeline.models.params import SettingsError
    from qmllm_pipeline.pipelines.evaluate.attackers.per_instruction import success_test

    bad = with_overrides(smoke_params["evaluate"], **{"per_instruction.stop_on": "sometimes"})
    with pytest.raises(SettingsError, match=r"parameters_evaluate.yml: evaluate.per_instruction.stop_on: expected one"):
        parse(EvaluateSettings, bad, "evaluate")
    assert success_test(None, pd.DataFrame({"instruction": [], "target": []}), "none", 16, 8) is None
