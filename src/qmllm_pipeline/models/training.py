"""The one training loop every trainer here shares (CLIP, the LLM, stage 1, stage 2), its configuration,
seeding, optimiser + schedule, and the loss plots and summaries. Torch's thread count is a run-wide
setting (`threads` in conf/base/parameters.yml, applied by a hook), not a loop argument."""

from __future__ import annotations

import json
import logging
import random
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402
from transformers import get_cosine_schedule_with_warmup  # noqa: E402

from qmllm_pipeline.models.checkpoint import ACCELERATE, TrainingCheckpoint, set_global_random_state  # noqa: E402
from qmllm_pipeline.models.device import resolve_device  # noqa: E402
from qmllm_pipeline.models.distributed import DistributedSettings, launch, make_accelerator  # noqa: E402
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


@dataclass(frozen=True)
class RunSettings:
    """What every training node of a run shares (conf/*/parameters.yml): the `seed`, the folder of resumable
    checkpoints, and the processes, strategy, precision and device training runs under."""
    seed: int
    checkpoint_dir: str
    distributed: DistributedSettings = DistributedSettings()

    @classmethod
    def from_params(cls, seed: int, checkpoint_dir: str, distributed: dict | None = None,
                    device: str = "auto") -> RunSettings:
        """The run's settings, from `seed`, `checkpoint_dir`, `distributed` and `device` (a Kedro node of every
        training pipeline: parsed once, read by every trainer)."""
        resolve_device(device)  # a device this machine lacks fails here, before anything runs
        settings = replace(DistributedSettings.from_params(distributed), device=str(device))
        return cls(int(seed), str(checkpoint_dir), settings)

    @property
    def node_device(self) -> torch.device:
        """Where a training pipeline's own model work runs outside the training loop (the small heads, the
        variant checks, the replayed answers): the `device` setting, except when training forks several GPU
        workers, where it stays on the CPU: a forked child cannot use CUDA once its parent has, and the next
        variant's training forks again."""
        if self.distributed.on_gpu and self.distributed.num_processes > 1:
            return torch.device("cpu")
        return resolve_device(self.distributed.device)


class TrainingRun:
    """One trainer's bookkeeping in a node: its resumable checkpoint (`<checkpoint_dir>/<name with _ for />`,
    valid for the `fingerprint` it was written under), its step logger (MLflow metrics `<name>/<loss>`), its
    timer, and the summary the node reports."""

    def __init__(self, name: str, run: RunSettings, fingerprint: dict, log_every: int):
        self.checkpoint = TrainingCheckpoint(Path(run.checkpoint_dir) / name.replace("/", "_"), fingerprint)
        self.step_logger = StepLogger(name, every=log_every)
        self.started = time.perf_counter()

    def seconds(self) -> float:
        return round(time.perf_counter() - self.started, 1)

    def final_losses(self, window: int = 20) -> dict[str, float]:
        """Each logged series' mean over its last `window` points (the learning rate left out)."""
        return {k: float(np.mean([v for _, v in points[-window:]]))
                for k, points in self.step_logger.history.items() if points and k != "lr"}

    def summary(self, training: TrainingConfig) -> dict:
        return {"seconds": self.seconds(), "steps": training.steps, "final": self.final_losses()}


def activation_checkpointing(llm: torch.nn.Module, on: bool) -> None:
    """Gradient (activation) checkpointing of a transformers model (or a peft model over one) on or off:
    on, each layer keeps its inputs only and recomputes the rest in the backward pass (non-reentrant, so a
    frozen model still passes the gradient to its input embeddings). Both names of the switch
    (`activation_checkpointing_*`, `gradient_checkpointing_*`) are tried, newest first."""
    kwargs = {"use_reentrant": False}
    if hasattr(llm, "activation_checkpointing_enable"):
        if on:
            llm.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            llm.activation_checkpointing_disable()
    elif on:
        llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        llm.gradient_checkpointing_disable()


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
               checkpoint: TrainingCheckpoint | None = None, desc: str = "train",
               distributed: DistributedSettings | None = None, carry: tuple[torch.nn.Module, ...] = ()) -> None:
    """The one training loop: AdamW + cosine schedule over the trainable parameters of `modules`.

    `step_fn(generator)` draws a batch and returns the losses of one step, `loss` being the one to
    minimise; every entry is logged. With a checkpoint, state is saved every `config.checkpoint_every` steps
    and a stopped run resumes from the last save (same configuration only); it is cleared at the end.

    With `distributed` the loop runs under Accelerate (`models/distributed.py`): in place for one process,
    else in `num_processes` forked workers, each drawing the same global batch and training on its share of
    it (the step function takes it with `rank_share`), gradients averaged by the strategy; rank 0 alone
    logs, checkpoints and hands the trained weights back to `modules` here (under a sharded strategy every
    process writes its part of the checkpoint, through Accelerate's `save_state`). Without it (the foundation
    trainers), plain PyTorch. `carry`: modules the step reads but does not train (the frozen LLM, a
    teacher), moved to the process's device with the trained ones.
    """
    if distributed is None or distributed.world_size == 1:
        accelerator = None if distributed is None else make_accelerator(distributed, config.batch_size,
                                                                       config.grad_clip)
        _run(modules, step_fn, config, seed, step_logger, checkpoint, desc, accelerator, carry)
        return
    if config.batch_size % distributed.world_size:
        raise ValueError(f"{desc}: the global batch of {config.batch_size} does not split evenly over "
                         f"{distributed.world_size} processes")
    with tempfile.TemporaryDirectory(prefix="qmllm-handoff-") as handoff:
        def worker() -> None:
            accelerator = make_accelerator(distributed, config.batch_size, config.grad_clip)
            history = StepLogger(step_logger.prefix, send=False) if step_logger is not None else None
            states = _run(modules, step_fn, config, seed, history, checkpoint, desc, accelerator, carry, distributed)
            if accelerator.is_local_main_process:  # each machine's first worker hands back to its own node
                for name, state in states.items():
                    save_file(state, Path(handoff) / f"{name}.safetensors")
                history_out = dict(history.history) if history is not None else {}
                (Path(handoff) / "history.json").write_text(json.dumps(history_out))
            accelerator.wait_for_everyone()

        launch(worker, distributed)
        for name, module in modules.items():
            module.load_state_dict(load_file(Path(handoff) / f"{name}.safetensors"))
            module.eval()
        if step_logger is not None:
            step_logger.replay(json.loads((Path(handoff) / "history.json").read_text()))
    logger.info("%s: trained in %d processes on %d machine(s) (%s)", desc, distributed.world_size,
                distributed.num_machines, distributed.strategy)


class _Step(torch.nn.Module):
    """A step as a module, for Accelerate to wrap (DDP, FSDP and DeepSpeed sync what runs in a wrapped
    module's forward): it holds the modules being trained and its forward is the step function."""

    def __init__(self, modules: dict[str, torch.nn.Module], step_fn: Callable):
        super().__init__()
        self.trained = torch.nn.ModuleDict(modules)
        self.step_fn = step_fn

    def forward(self, generator: torch.Generator) -> dict[str, torch.Tensor]:
        return self.step_fn(generator)


def _run(modules, step_fn, config, seed, step_logger, checkpoint, desc, accelerator, carry,
         distributed=None) -> dict[str, dict]:
    """The loop itself, in this process; with an `accelerator`, under it. Returns each module's trained
    state (gathered from the shards under FSDP / DeepSpeed) as rank 0 holds it."""
    generator = seed_everything(seed)
    trainable = [p for module in modules.values() for p in module.parameters() if p.requires_grad]
    optimizer, schedule = optimizer_and_schedule(trainable, config)
    main = accelerator is None or accelerator.is_main_process
    local_main = accelerator is None or accelerator.is_local_main_process  # checkpoints: one per machine
    sharded = distributed is not None and distributed.sharded  # then checkpoints are Accelerate's own
    state = _checkpoint_state(checkpoint, sharded)
    start = 1
    if state is not None and not sharded:
        start = _resume(modules, optimizer, schedule, generator, step_logger, state, desc, config, main)
    for module in modules.values():
        module.train()
    step = _Step(modules, step_fn)
    if accelerator is not None:
        for module in carry:
            module.to(accelerator.device)
        step, optimizer, schedule = accelerator.prepare(step, optimizer, schedule)
    if state is not None and sharded:  # the shards, optimiser, schedule and random states, after prepare
        accelerator.load_state(str(state["accelerate_dir"]))
        start = _resume_loop(generator, step_logger, state, desc, config, main)
    clip = trainable if accelerator is None else list(step.parameters())
    every = config.checkpoint_every
    progress = tqdm(range(start, config.steps + 1), desc=desc, unit="step", mininterval=2,
                    initial=start - 1, total=config.steps, disable=not main)
    for at in progress:
        losses = step(generator)
        optimizer.zero_grad(set_to_none=True)
        if accelerator is None:
            losses["loss"].backward()
            torch.nn.utils.clip_grad_norm_(clip, config.grad_clip)
        else:
            accelerator.backward(losses["loss"])
            accelerator.clip_grad_norm_(clip, config.grad_clip)
        optimizer.step()
        schedule.step()
        if accelerator is not None and accelerator.num_processes > 1:  # the mean over the processes
            losses = {k: accelerator.reduce(v.detach().float(), "mean") for k, v in losses.items()}
        if step_logger is not None and main:
            step_logger.log(at, **{k: v.item() for k, v in losses.items()}, lr=schedule.get_last_lr()[0])
        if at % 50 == 0:
            progress.set_postfix(loss=f"{losses['loss'].item():.3f}")
        if checkpoint is not None and every and at % every == 0 and at < config.steps:
            history = dict(step_logger.history) if step_logger is not None else {}
            if sharded:  # every process writes its shards
                checkpoint.save_sharded(at, accelerator, generator, history)
            else:
                if local_main:
                    checkpoint.save(at, modules, optimizer, schedule, generator, history)
                if accelerator is not None:
                    accelerator.wait_for_everyone()
    return _finish(modules, step, step_logger, checkpoint, accelerator, local_main)


def _checkpoint_state(checkpoint: TrainingCheckpoint | None, sharded: bool) -> dict | None:
    """The checkpoint to resume from, if there is one written the way this run writes them."""
    state = checkpoint.load() if checkpoint is not None else None
    if state is not None and (state.get("format") == ACCELERATE) != sharded:
        logger.warning("ignoring checkpoint %s: written by a %s run", checkpoint.directory,
                       "sharded" if not sharded else "one-process or DDP")
        return None
    return state


def _resume(modules, optimizer, schedule, generator, step_logger, state, desc, config, main) -> int:
    """The first step to run, the step after the checkpoint's, whose weights, optimiser, schedule, random
    streams (the loop's and torch's global one) and loss history are restored."""
    for name, module in modules.items():
        module.load_state_dict(state["module_states"][name])
    optimizer.load_state_dict(state["optimizer"])
    schedule.load_state_dict(state["schedule"])
    set_global_random_state(state)
    return _resume_loop(generator, step_logger, state, desc, config, main)


def _resume_loop(generator, step_logger, state, desc, config, main) -> int:
    """The loop's own part of a checkpoint (its random stream and the loss history); the step to run next."""
    generator.set_state(state["generator"])
    if step_logger is not None:
        step_logger.history.update({k: [tuple(p) for p in v] for k, v in state["history"].items()})
    if main:
        logger.info("%s: resuming from the checkpoint at step %d of %d", desc, state["step"], config.steps)
    return state["step"] + 1


def _finish(modules, step, step_logger, checkpoint, accelerator, local_main) -> dict[str, dict]:
    """After the last step: the history flushed, the checkpoint cleared, the modules in eval mode; each
    module's state gathered from the processes on rank 0 (several processes only), and under DDP as each
    machine's first process holds it (whole on every process)."""
    if step_logger is not None:
        step_logger.flush()
    states = {}
    if accelerator is not None and accelerator.num_processes > 1:
        full = accelerator.get_state_dict(step)  # gathered from the shards on rank 0
        states = {name: {key[len(f"trained.{name}."):]: value.detach().contiguous().clone()
                         for key, value in full.items() if key.startswith(f"trained.{name}.")}
                  for name in modules} if local_main else {}
    if checkpoint is not None and local_main:
        checkpoint.clear()
    for module in modules.values():
        module.eval()
    return states
