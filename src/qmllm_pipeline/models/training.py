"""Small pieces every training loop here shares: seeding, threads, optimiser + schedule, loss plots."""

from __future__ import annotations

import logging
import random
from collections.abc import Callable

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


def seed_and_threads(seed: int, threads: int) -> torch.Generator:
    """Seed python, numpy and torch; set torch's thread count (oversubscribed threads are 5-20x slower on
    2 cores). Returns a generator for the loop's own sampling."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    return torch.Generator().manual_seed(seed)


def optimizer_and_schedule(parameters, lr: float, weight_decay: float, warmup_steps: int, steps: int):
    optimizer = torch.optim.AdamW([p for p in parameters if p.requires_grad], lr=lr, weight_decay=weight_decay)
    return optimizer, get_cosine_schedule_with_warmup(optimizer, warmup_steps, steps)


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
               params: dict, seed: int, threads: int, step_logger: StepLogger | None = None,
               checkpoint: TrainingCheckpoint | None = None, desc: str = "train") -> None:
    """The one training loop: AdamW + cosine schedule over the trainable parameters of `modules`.

    `step_fn(generator)` draws a batch and returns the losses of one step, `loss` being the one to
    minimise; every entry is logged. With a checkpoint, state is saved every `checkpoint_every` steps
    and a stopped run resumes from the last save (same configuration only); it is cleared at the end.
    """
    generator = seed_and_threads(seed, threads)
    trainable = [p for module in modules.values() for p in module.parameters() if p.requires_grad]
    optimizer, schedule = optimizer_and_schedule(trainable, params["lr"], params["weight_decay"],
                                                 params["warmup_steps"], params["steps"])
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
        logger.info("%s: resuming from the checkpoint at step %d of %d", desc, state["step"], params["steps"])
    for module in modules.values():
        module.train()
    every = params.get("checkpoint_every", 0)
    progress = tqdm(range(start, params["steps"] + 1), desc=desc, unit="step", mininterval=2,
                    initial=start - 1, total=params["steps"])
    for step in progress:
        losses = step_fn(generator)
        optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        torch.nn.utils.clip_grad_norm_(trainable, params["grad_clip"])
        optimizer.step()
        schedule.step()
        if step_logger is not None:
            step_logger.log(step, **{k: v.item() for k, v in losses.items()}, lr=schedule.get_last_lr()[0])
        if step % 50 == 0:
            progress.set_postfix(loss=f"{losses['loss'].item():.3f}")
        if checkpoint is not None and every and step % every == 0 and step < params["steps"]:
            history = dict(step_logger.history) if step_logger is not None else {}
            checkpoint.save(step, modules, optimizer, schedule, generator, history)
    if step_logger is not None:
        step_logger.flush()
    if checkpoint is not None:
        checkpoint.clear()
    for module in modules.values():
        module.eval()
