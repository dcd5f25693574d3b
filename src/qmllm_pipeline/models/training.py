"""Small pieces every training loop here shares: seeding, threads, optimiser + schedule, loss plots."""

from __future__ import annotations

import random

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from transformers import get_cosine_schedule_with_warmup  # noqa: E402


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
