"""Guarded inference: a refused image never reaches the LLM; accepted ones get an answer."""

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from qmllm_pipeline.models.guarded import GuardedMLLM, GuardedQMLLM
from qmllm_pipeline.models.qmllm import QMLLM


def _guarded(stages, foundation, refuse_all: bool) -> GuardedQMLLM:
    model = QMLLM.assemble(stages["qmllm.qmllm_config"], stages["qmllm.stage1_weights"], stages["qmllm.finetuned_llm"],
                           foundation["clip_model"])
    table = stages["safety_map"].copy()
    table["label"] = "weapon" if refuse_all else "neutral"
    return GuardedQMLLM(model, foundation["tokenizer"], foundation["clip_image_processor"], table)


def _images(world, n):
    from qmllm_pipeline.world.render import image_from_png

    return [image_from_png(b) for b in world["eval_toxic"]["image"].iloc[:n]]


def test_refused_images_never_reach_the_llm(stages, foundation, world, monkeypatch):
    guarded = _guarded(stages, foundation, refuse_all=True)
    calls = []
    monkeypatch.setattr(guarded.model, "generate", lambda *a, **k: calls.append(a) or torch.zeros((0, 0)))
    answers = guarded.answer(_images(world, 3), ["Describe the image."] * 3)
    assert not calls
    assert all(a.verdict.refused and a.verdict.category == "weapon" and "weapon" in a.text for a in answers)


def test_accepted_images_are_answered_in_one_batch(stages, foundation, world):
    guarded = _guarded(stages, foundation, refuse_all=False)
    images = _images(world, 3)
    verdicts = guarded.check(images)
    assert [v.refused for v in verdicts] == [False] * 3
    assert all(0 <= v.code < len(stages["safety_map"]) for v in verdicts)
    answers = guarded.answer(images, ["Describe the image."] * 3, max_new_tokens=4)
    assert len(answers) == 3 and all(isinstance(a.text, str) and not a.verdict.refused for a in answers)
    odd = Image.fromarray(np.zeros((50, 70, 3), dtype=np.uint8))  # another size goes through the processor
    assert guarded.check([odd])[0].code in set(pd.Series(range(len(stages["safety_map"]))))


def test_a_system_without_a_guard_must_say_so(stages):
    model = stages["qmllm.finetuned_model"].model
    tokenizer, processor = stages["qmllm.finetuned_model"].tokenizer, stages["qmllm.finetuned_model"].processor
    with pytest.raises(ValueError, match="unguarded=True"):
        GuardedMLLM(model, tokenizer, processor)  # a forgotten guard: refused, not "every image is neutral"
    assert GuardedMLLM(model, tokenizer, processor, unguarded=True).guard is None


def test_a_code_the_map_does_not_hold_is_refused(stages):
    from qmllm_pipeline.models.guarded import SafetyMapGuard

    table = stages["safety_map"]
    neutral = int(table.loc[table["label"] == "neutral", "code"].iloc[0])
    guard = SafetyMapGuard(table[table["code"] != neutral])  # the row of a neutral code lost
    (verdict,) = guard(None, torch.tensor([neutral]))
    assert verdict.refused and verdict.category == "unseen"
