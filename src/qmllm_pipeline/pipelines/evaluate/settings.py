"""The `evaluate` section of the parameters as typed, frozen settings (`parse(EvaluateSettings, params,
"evaluate")`), read once where a node starts. The attackers and the budgets are listed here and nowhere else:
a new attacker is an entry in `evaluate.attackers` (its `kind` names a module of `attackers/`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Objective = Literal["target", "margin", "refusal"]


@dataclass(frozen=True)
class Case:
    """One row of the jailbreak table: an attacker's images judged on `system`, reported as `label`."""
    system: str
    label: str


@dataclass(frozen=True)
class AttackerSpec:
    """`evaluate.attackers.<name>`: how the attacker crafts its images at every budget (`kind`: `universal`,
    one image for every instruction; `per_instruction`, one image per held-out instruction; `noise`, the
    control: the budget spent at random), on which `system` it computes gradients, and the `cases`, by name,
    that judge its images (its own system's, and the systems the images transfer to). `straight_through`:
    gradients pass the quantizers as the identity (BPDA); `continuous_surrogate`: the forward pass skips them
    too; `cls_weight` > 0: a term keeps the CLS code at the nearest neutral-labelled code (a system with a
    safety map)."""
    kind: str
    cases: dict[str, Case]
    system: str | None = None
    straight_through: bool = False
    continuous_surrogate: bool = False
    cls_weight: float = 0.0


@dataclass(frozen=True)
class Budget:
    """`evaluate.budgets.<name>`: the L_inf bound in 1/255 (None: unconstrained, starting from noise)."""
    name: str
    eps: int | None

    @property
    def linf(self) -> float | None:
        """The bound on the [0, 1] pixel scale."""
        return None if self.eps is None else self.eps / 255


@dataclass(frozen=True)
class JailbreakSettings:
    """`evaluate.jailbreak`: Qi et al.'s universal image (PGD with a signed step of `step_size`/255), the
    instructions it is optimised on and judged on, and the sequences' length and target tokens."""
    steps: int = 100
    step_size: int = 1
    batch_size: int = 16
    train_instructions: int | None = 64
    heldout_instructions: int | None = None
    max_length: int = 96
    target_tokens: int | None = 5
    max_new_tokens: int = 16
    start_rank: int = 0


@dataclass(frozen=True)
class PerInstructionSettings:
    """`evaluate.per_instruction`: one image per held-out instruction (steps, step schedule, momentum,
    restarts, batch, objective, and the attacker's own success test)."""
    steps: int = 80
    step_size: int = 8
    schedule: Literal["constant", "linear"] = "linear"
    momentum: float = 0.9
    restarts: int = 1
    batch_size: int = 36
    objective: Objective = "target"
    kappa: float = 2.0
    stop_on: Literal["none", "complied", "affirmative"] = "affirmative"
    check_every: int = 10


@dataclass(frozen=True)
class CodeSearchSettings:
    """`evaluate.code_search`: the code-space bound on qmllm (a beam coordinate search over what its LLM
    reads)."""
    instructions: int | None = None
    start_from_attacks: bool = True
    names: bool = True
    sweeps: int = 1
    beam_width: int = 1
    candidates: int | None = 32
    batch_size: int = 256
    objective: Objective = "target"
    kappa: float = 2.0


@dataclass(frozen=True)
class ToxicImageSettings:
    prompts: tuple[str, ...]
    max_new_tokens: int = 16


@dataclass(frozen=True)
class OverheadSettings:
    queries: int = 20
    prompt: str = "Describe the image."
    max_new_tokens: int = 16


@dataclass(frozen=True)
class EvaluateSettings:
    """`evaluate`."""
    attackers: dict[str, AttackerSpec]
    budgets: dict[str, Budget]
    toxic_image: ToxicImageSettings
    jailbreak: JailbreakSettings = field(default_factory=JailbreakSettings)
    per_instruction: PerInstructionSettings = field(default_factory=PerInstructionSettings)
    code_search: CodeSearchSettings = field(default_factory=CodeSearchSettings)
    code_stability: dict[str, int] = field(default_factory=lambda: {"images": 64})
    utility: dict[str, int] = field(default_factory=lambda: {"max_new_tokens": 20})
    overhead: OverheadSettings = field(default_factory=OverheadSettings)
    batch_size: int = 64

    def cases(self) -> dict[str, tuple[str, Case]]:
        """Every judged case by name: (the attacker whose images it judges, the case)."""
        return {case: (name, spec) for name, attacker in self.attackers.items()
                for case, spec in attacker.cases.items()}

    def system_cases(self, system: str, with_noise: bool = True) -> list[str]:
        """The cases judged on `system`, in the attackers' order (`with_noise`: the noise control's too)."""
        return [case for name, attacker in self.attackers.items() for case, spec in attacker.cases.items()
                if spec.system == system and (with_noise or attacker.kind != "noise")]
