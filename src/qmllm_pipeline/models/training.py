"""The one training loop every trainer here shares (CLIP, the LLM, stage 1, stage 2), its configuration,
seeding, optimiser + schedule, and the loss plots and summaries. Torch's thread count is a run-wide
setting (`threads` in conf/base/parameters.yml, applied by a hook), not a loop argument."""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from dataclasses import asdict, dataclass

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402
from transformers import get_cosine_schedule_with_warmup  # noqa: E402

from qmllm_pipeline.models.checkpoint import TrainingCheckpoint  # noqa: E402
from qmllm_pipeline.tracking import StepLogger  # noqa: E402

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainingConfig:
    """How long and how fast a trainer runs: AdamW over the trainable parameters, linear warm-up then cosine
    decay, gradient clipping; a resumable checkpoint every `checkpoint_every` steps (0: never)."""
    steps: int
    batch_size: int
    lr: float
    weight_decay: float = 0.0
    warmup_steps: int = 0
    grad_clip: float = 1.0
    checkpoint_every: int = 0

    def as_dict(self) -> dict:
        return asdict(self)


def seed_everything(seed: int) -> torch.Generator:
    """Seed python, numpy and torch; returns a generator for the loop's own sampling."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def optimizer_and_schedule(parameters, config: TrainingConfig):
    optimizer = torch.optim.AdamW([p for p in parameters if p.requires_grad], lr=config.lr,
                                  weight_decay=config.weight_decay)
    return optimizer, get_cosine_schedule_with_warmup(optimizer, config.warmup_steps, config.steps)


def loss_ends(values: list[float], window: int = 20) -> tuple[float, float]:
    """The mean of the first and of the last `window` values (at most a fifth of them): a loss's start and end
    with the batch noise smoothed out."""
    window = max(1, min(window, len(values) // 5))
    return float(np.mean(values[:window])), float(np.mean(values[-window:]))


def loss_curve_figure(history: dict[str, list[tuple[int, float]]], title: str, smooth: int = 20):
    """One line per logged series (a running mean over `smooth` steps, raw values faint behind it)."""
    figure, axis = plt.subplots(figsize=(7, 4))
    for name, points in history.items():
        if not points:
            continue
        steps, values = map(np.asarray, zip(*points, strict=True))
        line, = axis.plot(steps, values, alpha=0.25)
        if len(values) >= smooth:
            kernel = np.ones(smooth) / smooth
            axis.plot(steps[smooth - 1:], np.convolve(values, kernel, mode="valid"), color=line.get_color(),
                      label=name)
        else:
            line.set_label(name)
            line.set_alpha(1.0)
    axis.set_xlabel("step")
    axis.set_ylabel("value")
    axis.set_title(title)
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    return figure


def train_loop(modules: dict[str, torch.nn.Module], step_fn: Callable[[torch.Generator], dict[str, torch.Tensor]],
               config: TrainingConfig, seed: int, step_logger: StepLogger | None = None,
               checkpoint: TrainingCheckpoint | None = None, desc: str = "train") -> None:
    """The one training loop: AdamW + cosine schedule over the trainable parameters of `modules`.

    `step_fn(generator)` draws a batch and returns the losses of one step, `loss` being the one to
    minimise; every entry is logged. With a checkpoint, state is saved every `config.checkpoint_every` steps
    and a stopped run resumes from the last save (same configuration only); it is cleared at the end.
    """
    generator = seed_everything(seed)
    trainable = [p for module in modules.values() for p in module.parameters() if p.requires_grad]
    optimizer, schedule = optimizer_and_schedule(trainable, config)
    start = 1
    state = checkpoint.load() if checkpoint is not None else None
    if state is not None:
        for name, module in modules.items():
            module.load_state_dict(state["module_states"][name])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        generator.set_state(state["generator"])
        if step_logger is not None:
            step_logger.history.update({k: [tuple(p) for p in v] for k, v in state["history"].items()})
        start = state["step"] + 1
        logger.info("%s: resuming from the checkpoint at step %d of %d", desc, state["step"], config.steps)
    for module in modules.values():
        module.train()
    every = config.checkpoint_every
    progress = tqdm(range(start, config.steps + 1), desc=desc, unit="step", mininterval=2,
                    initial=start - 1, total=config.steps)
    for step in progress:
        losses = step_fn(generator)
        optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        torch.nn.utils.clip_grad_norm_(trainable, config.grad_clip)
        optimizer.step()
        schedule.step()
        if step_logger is not None:
            step_logger.log(step, **{k: v.item() for k, v in losses.items()}, lr=schedule.get_last_lr()[0])
        if step % 50 == 0:
            progress.set_postfix(loss=f"{losses['loss'].item():.3f}")
        if checkpoint is not None and every and step % every == 0 and step < config.steps:
            history = dict(step_logger.history) if step_logger is not None else {}
            checkpoint.save(step, modules, optimizer, schedule, generator, history)
    if step_logger is not None:
        step_logger.flush()
    if checkpoint is not None:
        checkpoint.clear()
    for module in modules.values():
        module.eval()
