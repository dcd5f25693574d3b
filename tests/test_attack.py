"""The jailbreak attack on the smoke models: PGD stays in its budget, the deployed Q-MLLM gives it no
gradient, straight-through (BPDA) does, and on the continuous baseline PGD lowers the target loss."""

import pandas as pd
import pytest
import torch

from qmllm_pipeline.models.attack import JailbreakObjective, first_target_tokens, target_sequences, universal_pgd


def _objective(system, text_corpus: pd.DataFrame, straight_through: bool) -> JailbreakObjective:
    harmful = text_corpus[(text_corpus["kind"] == "harmful") & (text_corpus["split"] == "train")].head(4)
    sequences = target_sequences(system.tokenizer, list(harmful["instruction"]), list(harmful["target"]), 96, None)
    # the whole set every step: the loss is then a deterministic function of the image
    return JailbreakObjective(system.model, system.processor, sequences, len(sequences), straight_through)


@pytest.fixture(scope="module")
def start(evaluation) -> torch.Tensor:
    return evaluation["jailbreak_start"]["image"].float() / 255


def test_the_deployed_qmllm_gives_pgd_no_gradient(evaluation, world, start):
    objective = _objective(evaluation["evaluation_systems"]["qmllm"], world["text_corpus"], straight_through=False)
    image, history = universal_pgd(objective, start, eps=16 / 255, steps=3, desc=None)
    assert history["grad_abs_mean"] == [0.0, 0.0, 0.0]
    assert torch.equal(image, start)  # the argmin blocks every step: the image never moves


def test_straight_through_reaches_the_pixels_and_pgd_keeps_its_budget(evaluation, world, start):
    objective = _objective(evaluation["evaluation_systems"]["qmllm"], world["text_corpus"], straight_through=True)
    image, history = universal_pgd(objective, start, eps=4 / 255, steps=6, desc=None)
    assert min(history["grad_abs_mean"]) > 0
    assert (image - start).abs().max() <= 4 / 255 + 1e-6
    assert torch.equal(image, (image * 255).round() / 255) and 0 <= image.min() and image.max() <= 1


def test_white_box_pgd_lowers_the_target_loss_of_the_baseline(evaluation, world, start):
    objective = _objective(evaluation["evaluation_systems"]["baseline"], world["text_corpus"], straight_through=False)
    generator = torch.Generator().manual_seed(0)
    image, history = universal_pgd(objective, start, eps=32 / 255, steps=20, desc=None)
    with torch.no_grad():
        assert float(objective(image[None], generator)) < history["loss"][0]


def test_unconstrained_pgd_starts_from_noise(evaluation, world, start):
    objective = _objective(evaluation["evaluation_systems"]["baseline"], world["text_corpus"], straight_through=False)
    image, _ = universal_pgd(objective, start, eps=None, steps=1, desc=None)
    assert (image - start).abs().max() > 0.5


def test_the_loss_can_be_kept_on_the_affirmative_opening_only():
    ids, labels = [1, 2, 3, 4, 5, 6], [-100, -100, 13, 14, 15, 16]
    assert first_target_tokens(ids, labels, None) == (ids, labels)
    assert first_target_tokens(ids, labels, 2) == (ids, [-100, -100, 13, 14, -100, -100])


def test_an_attacker_config_that_cannot_work_is_refused(evaluation, smoke_params):
    from qmllm_pipeline.pipelines.evaluate.attacks import craft_jailbreak_image

    params = smoke_params["evaluate"]
    budget = params["budgets"]["eps16"]
    common = (evaluation["evaluation_systems"], evaluation["jailbreak_instructions"], evaluation["jailbreak_start"],
              params["jailbreak"])
    with pytest.raises(ValueError, match="needs a system with a safety map"):
        craft_jailbreak_image(*common, {**params["attackers"]["baseline_whitebox"], "cls_weight": 1.0}, budget, 0)
    with pytest.raises(ValueError, match="unknown system"):
        craft_jailbreak_image(*common, {**params["attackers"]["qmllm_plain"], "system": "llava"}, budget, 0)
