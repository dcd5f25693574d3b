"""The control every attack must beat: the start image with every pixel moved by +-eps at random (uniform noise
when unconstrained), no model, no gradient."""

from __future__ import annotations

import torch

from qmllm_pipeline.models.attack import random_sign_noise
from qmllm_pipeline.pipelines.evaluate.attackers import Crafted

KIND = "noise"


def craft(name, spec, systems, instructions, start, settings, budget, seed) -> Crafted:
    image = random_sign_noise(start["image"].float() / 255, budget.linf, seed)
    return Crafted((image * 255).round().to(torch.uint8))


def summary(crafted: Crafted) -> dict:
    return {}
