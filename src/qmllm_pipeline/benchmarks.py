"""Benchmarks: what the defense costs, as ratios measured side by side in one process (`qmllm bench`).

Each ratio is timed in alternation (numerator, denominator, numerator, ...) so that drift in the machine
affects both sides alike; the table gives the median ratio and its spread (25th-75th percentile) over the
repeats. No test asserts a timing: the goals are printed next to the measurements.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from qmllm_pipeline.constants import STAGES
from qmllm_pipeline.models.clip import pixel_values
from qmllm_pipeline.models.guarded import GuardedMLLM
from qmllm_pipeline.models.quantizer import VectorQuantizer
from qmllm_pipeline.models.stage1 import Stage1Data, stage1_losses


@dataclass
class Row:
    name: str
    median: float
    low: float           # 25th percentile
    high: float          # 75th percentile
    goal: str            # e.g. "<= 1.10"
    unit: str = "x"

    @property
    def met(self) -> bool | None:
        if not self.goal:
            return None
        operator, value = self.goal.split()
        return self.median <= float(value) if operator == "<=" else self.median >= float(value)


def _seconds(fn: Callable[[], object]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def paired_ratio(name: str, numerator: Callable, denominator: Callable, repeats: int, goal: str = "",
                 warmup: int = 2) -> Row:
    for _ in range(warmup):
        numerator(), denominator()
    ratios = []
    for _ in range(repeats):
        below = _seconds(denominator)
        ratios.append(_seconds(numerator) / below)
    low, median, high = np.percentile(ratios, [25, 50, 75])
    return Row(name, float(median), float(low), float(high), goal)


def rate(name: str, fn: Callable, items: int, repeats: int, warmup: int = 2) -> Row:
    """Items per second."""
    for _ in range(warmup):
        fn()
    rates = [items / _seconds(fn) for _ in range(repeats)]
    low, median, high = np.percentile(rates, [25, 50, 75])
    return Row(name, float(median), float(low), float(high), "", "/s")


@torch.no_grad()
def answer_rows(systems: dict[str, GuardedMLLM], neutral: torch.Tensor, toxic: torch.Tensor, repeats: int,
                 new_tokens: int = 16) -> list[Row]:
    """Rows 1-3: the verdict against the vision tower, qmllm against baseline at equal answer length, and a
    refusal against an answer. `neutral` and `toxic` are uint8 images; row 3 needs a toxic image that
    qmllm's guard refuses."""
    qmllm, baseline = systems["qmllm"], systems["baseline"]
    tower = qmllm.model.vision_tower
    batch = pixel_values(neutral[:8], qmllm.processor)
    single = pixel_values(neutral[:1], qmllm.processor)
    refused = [i for i, v in enumerate(qmllm.check_pixels(pixel_values(toxic, qmllm.processor))) if v.refused]
    prompt = ["Describe the image."]

    def answer(system: GuardedMLLM, pixels: torch.Tensor):
        return lambda: system.answer_pixels(pixels, prompt * len(pixels), new_tokens, min_new_tokens=new_tokens)

    rows = [
        paired_ratio("1. safety verdict / vision-tower forward (batch 8)", lambda: qmllm.check_pixels(batch),
                     lambda: tower(batch), repeats, "<= 1.10"),
        paired_ratio(f"2. qmllm / baseline full answer ({new_tokens} tokens, batch 1)", answer(qmllm, single),
                     answer(baseline, single), repeats, "<= 1.05"),
    ]
    if refused:
        toxic_pixels = pixel_values(toxic[refused[:1]], qmllm.processor)
        rows.append(paired_ratio("3. refusal / full answer (qmllm, batch 1)", answer(qmllm, toxic_pixels),
                                 answer(qmllm, single), repeats, "<= 0.20"))
    else:
        rows.append(Row("3. refusal / full answer: no toxic image refused, not measured", float("nan"),
                        float("nan"), float("nan"), ""))
    return rows


@torch.no_grad()
def throughput_rows(system: GuardedMLLM, neutral: torch.Tensor, repeats: int) -> list[Row]:
    """Row 6: safety verdicts per second at batch 1, 8 and 32."""
    rows = []
    for size in (1, 8, 32):
        pixels = pixel_values(neutral[np.arange(size) % len(neutral)], system.processor)
        rows.append(rate(f"6. verdict throughput, batch {size} (images)", lambda p=pixels: system.check_pixels(p),
                         size, repeats))
    return rows


@torch.no_grad()
def nearest_code_rows(repeats: int, shapes: tuple[tuple[int, int, int], ...] = ((512, 256, 128),
                                                                               (576, 16000, 256))) -> list[Row]:
    """Row 4: `VectorQuantizer.nearest` against the floor (one matrix product of the same shape) and against
    `torch.cdist` + argmin, for (vectors, codes, dim) shapes: the default world's batch and paper-sized P."""
    rows = []
    generator = torch.Generator().manual_seed(0)
    for vectors, codes, dim in shapes:
        quantizer = VectorQuantizer(codes, dim)
        x = torch.randn(vectors, dim, generator=generator)
        codebook = quantizer.codebook.detach()
        label = f"N={vectors}, K={codes}, d={dim}"
        rows.append(paired_ratio(f"4. nearest code / matmul floor ({label})", lambda q=quantizer, x=x: q.nearest(x),
                                 lambda x=x, c=codebook: x @ c.T, repeats, "<= 2.00"))
        rows.append(paired_ratio(f"4. nearest code / cdist + argmin ({label})", lambda q=quantizer, x=x: q.nearest(x),
                                 lambda x=x, c=codebook: torch.cdist(x, c).argmin(1), repeats, ""))
    return rows


def stage1_row(model, pixels: torch.Tensor, cls_features: torch.Tensor, patch_features: torch.Tensor,
               examples: list, repeats: int, steps: int = 10, batch_size: int = 32) -> Row:
    """Row 5: stage-1 steps from cached features against the same steps from pixels (the model's frozen
    vision tower run inside every step), same rows, same projector and codebook updates. Trains `model`:
    pass a copy."""
    tower = model.vision_tower
    model.train()
    optimizer = torch.optim.AdamW(model.mm_projector.parameters(), lr=1e-4)
    generator = torch.Generator().manual_seed(0)
    plan = [torch.randint(len(examples), (batch_size,), generator=generator) for _ in range(steps)]

    def run(from_pixels: bool):
        def epoch():
            for picks in plan:
                batch = [examples[int(i)] for i in picks]
                if from_pixels:  # the tower's features of this batch, then rows 0..B-1 of them
                    with torch.no_grad():
                        cls, patches = tower(pixels[torch.tensor([e[2] for e in batch])])
                    batch = [(ids, labels, row) for row, (ids, labels, _) in enumerate(batch)]
                else:
                    cls, patches = cls_features, patch_features
                loss = stage1_losses(model, Stage1Data(cls, patches, batch), batch)["loss"]
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        return epoch

    row = paired_ratio(f"5. stage-1 from pixels / from cached features ({steps} steps of {batch_size})",
                       run(True), run(False), repeats, ">= 5.00", warmup=1)
    model.eval()
    return row


def pgd_step_row(system: GuardedMLLM, image: torch.Tensor, instructions: list[str], targets: list[str],
                 max_length: int, target_tokens: int, repeats: int) -> Row:
    """7. One per-instruction PGD step (forward and backward, one image per instruction) on the sequences
    the attack uses, cut after the target's first `target_tokens` tokens, over the same step on the whole
    target's sequences with the loss on the same tokens (the same loss, tests/test_attack.py)."""
    from qmllm_pipeline.models.attack import PerInstructionObjective, target_sequences

    cut = target_sequences(system.tokenizer, instructions, targets, max_length, target_tokens)
    whole = [(ids, labels + [-100] * (len(ids) - len(labels))) for (ids, _), (_, labels)
             in zip(target_sequences(system.tokenizer, instructions, targets, max_length, None), cut, strict=True)]
    pixels = (image.float() / 255).expand(len(instructions), -1, -1, -1)

    def step(sequences: list[tuple[list[int], list[int]]]) -> Callable[[], object]:
        objective = PerInstructionObjective(system.model, system.processor, sequences)

        def run():
            x = pixels.clone().requires_grad_(True)
            torch.autograd.grad(objective(x, list(range(len(sequences))))[0].sum(), x)
        return run

    return paired_ratio(f"7. per-instruction PGD step, target opening / whole target ({len(instructions)} images)",
                        step(cut), step(whole), repeats)


def format_table(rows: list[Row], header: str = "") -> str:
    lines = [header] if header else []
    lines += ["| measurement | median | 25-75% | goal | met |", "|---|---|---|---|---|"]
    for row in rows:
        if np.isnan(row.median):
            lines.append(f"| {row.name} | n/a | | | |")
            continue
        met = "" if row.met is None else ("yes" if row.met else "**no**")
        number = "{:,.0f}" if row.unit == "/s" else "{:.3g}"
        spread = f"{number.format(row.low)}-{number.format(row.high)}"
        lines.append(f"| {row.name} | {number.format(row.median)}{row.unit} | {spread} | {row.goal} | {met} |")
    return "\n".join(lines)


def run_profile_table(project, env: str) -> str:
    """Time per pipeline and peak RSS of the latest finished default `kedro run` in this environment, from
    the MLflow store (recorded by `hooks.RunProfileHook`)."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    # a plain `kedro run` runs in `local`, which only adds git-ignored overrides to `base`
    envs = {env, "local"} if env == "base" else {env}
    experiment = client.get_experiment_by_name("qmllm_pipeline") if (project / "mlflow.db").exists() else None
    candidates = [] if experiment is None else client.search_runs(
        [experiment.experiment_id], "tags.pipeline = '__default__' and attributes.status = 'FINISHED' and "
        "metrics.`profile/peak_rss_mb` > 0", order_by=["attributes.start_time DESC"], max_results=50)
    runs = [run for run in candidates if run.data.tags.get("env") in envs][:1]
    if not runs:
        return f"(no finished default `kedro run --env {env}` with a profile in {project / 'mlflow.db'} yet)"
    metrics = runs[0].data.metrics
    lines = [f"latest default `kedro run` (MLflow run {runs[0].info.run_id[:8]}):", "",
             "| pipeline | seconds |", "|---|---|"]
    lines += [f"| {stage} | {metrics[f'profile/{stage}/seconds']:.0f} |" for stage in STAGES
              if f"profile/{stage}/seconds" in metrics]
    lines += [f"| **total** | {metrics.get('profile/total_seconds', float('nan')):.0f} |", "",
              f"peak resident memory: {metrics['profile/peak_rss_mb']:.0f} MiB"]
    return "\n".join(lines)
