"""The attackers of the jailbreak evaluation, one module per kind of crafting. A module defines `KIND` (the
`kind` an entry of `evaluate.attackers` names), `craft(...)` returning a `Crafted`, and `summary(crafted)`,
the figures the report keeps of its optimisation ({} for none). Every module of this package is found by
its `KIND`: a new kind of attacker is one module here and one parameters entry."""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass

import torch

from qmllm_pipeline.pipelines.evaluate.settings import AttackerSpec, Budget, EvaluateSettings


@dataclass(frozen=True)
class Crafted:
    """An attacker's images at one budget, uint8: (3, H, W) for one image used with every instruction, or
    (n, 3, H, W), one per held-out instruction; the optimisation's history (None: no optimisation) and time."""
    image: torch.Tensor
    history: dict | None = None
    seconds: float = 0.0


def _registry() -> dict:
    modules = {}
    for info in pkgutil.iter_modules(__path__):
        module = importlib.import_module(f"{__name__}.{info.name}")
        if hasattr(module, "KIND"):
            modules[module.KIND] = module
    return modules


KINDS = _registry()


def kind_of(spec: AttackerSpec, name: str):
    if spec.kind not in KINDS:
        raise ValueError(f"conf/*/parameters_evaluate.yml: evaluate.attackers.{name}.kind: unknown kind "
                         f"{spec.kind!r} (one of {', '.join(sorted(KINDS))})")
    return KINDS[spec.kind]


def craft(name: str, spec: AttackerSpec, systems: dict, instructions: dict, start: dict,
          settings: EvaluateSettings, budget: Budget, seed: int) -> Crafted:
    """Attacker `name`'s images at `budget`, crafted by the module of its kind."""
    return kind_of(spec, name).craft(name, spec, systems, instructions, start, settings, budget, seed)


def summary(name: str, spec: AttackerSpec, crafted: Crafted) -> dict:
    """What the report keeps of attacker `name`'s optimisation at one budget ({} for none)."""
    return kind_of(spec, name).summary(crafted)
