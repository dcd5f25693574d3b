"""Training on more than one process, on Hugging Face Accelerate: DDP, FSDP or DeepSpeed ZeRO-2/3, chosen by
`DistributedSettings` (`distributed` in conf/base/parameters.yml).

How it runs. The Kedro node that trains stays one process: `launch` forks `num_processes` workers on this
machine (Accelerate's own launcher code: `PrepareForLaunch` + `torch.multiprocessing`, as
`notebook_launcher` does for GPUs and `debug_launcher` for CPUs), each builds its `Accelerator` and runs the
same training loop on its share of every global batch (`rank_share`), and the main process (rank 0) alone
writes checkpoints and hands the trained weights and loss history back to the node through a temporary
folder. The node then returns them to Kedro, which saves them once and logs them to MLflow once. Wrapping
the whole `kedro run` in `accelerate launch` instead would run every node (data loading, evaluation,
saving, MLflow runs) N times; forking inside the node keeps the pipeline one run. The fork needs CUDA
untouched in the parent (the node loads everything to the CPU; each worker moves its copy to its own GPU).

Several machines (`num_machines` > 1, DDP only): the same `kedro run` starts on each, with its
`machine_rank` and the first machine's address as `main_process_ip`; the training nodes' workers of all the
machines form one process group over TCP (global rank = machine_rank x num_processes + local rank), and each
machine's first worker hands the trained weights back to its own node (under DDP every process holds them
whole). Everything outside the training loop runs on every machine, on its own copy of the data; the first
machine's outputs and MLflow run (the loss history is logged there) are the ones to keep.

With one process the loop runs in place under a one-process `Accelerator`: the same steps, in the same
order, as plain PyTorch (mixed precision and the device aside).
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace

import torch
import torch.distributed as dist

from qmllm_pipeline.models.device import resolve_device

logger = logging.getLogger(__name__)
STRATEGIES = ("ddp", "fsdp", "deepspeed_zero2", "deepspeed_zero3")
MIXED_PRECISION = ("no", "bf16", "fp16")
SHARDED = ("fsdp", "deepspeed_zero2", "deepspeed_zero3")  # weights or optimiser state split over the processes


@dataclass(frozen=True)
class DistributedSettings:
    """`num_processes` workers on this machine (1 on one machine: in place, as plain PyTorch), the `strategy`
    that splits the work between them, `mixed_precision` for the forward pass (Accelerate's autocast), the
    rendezvous `port`, for a run over `num_machines` machines this one's `machine_rank` and the first
    machine's address `main_process_ip` (where the rendezvous is), and the `device` the workers train on
    (the run-wide `device` setting, `models/device.py`: auto, cpu or cuda)."""
    num_processes: int = 1
    strategy: str = "ddp"
    mixed_precision: str = "no"
    port: int = 29500
    num_machines: int = 1
    machine_rank: int = 0
    main_process_ip: str = "127.0.0.1"
    device: str = "auto"

    @property
    def world_size(self) -> int:
        """Processes over every machine."""
        return self.num_processes * self.num_machines

    @property
    def sharded(self) -> bool:
        """Whether the strategy splits the weights or the optimiser state over several processes, so that only
        Accelerate can save and restore them (`Accelerator.save_state` / `load_state`)."""
        return self.strategy in SHARDED and self.world_size > 1

    def __post_init__(self):
        if self.num_processes < 1:
            raise ValueError(f"distributed.num_processes must be at least 1, got {self.num_processes}")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"distributed.strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        if self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(f"distributed.mixed_precision must be one of {MIXED_PRECISION}, "
                             f"got {self.mixed_precision!r}")
        if self.num_machines < 1 or not 0 <= self.machine_rank < self.num_machines:
            raise ValueError(f"distributed.machine_rank must be in [0, num_machines), got {self.machine_rank} of "
                             f"{self.num_machines}")
        if self.num_machines > 1 and self.strategy != "ddp":
            raise ValueError(f"distributed.num_machines {self.num_machines}: several machines train with ddp only "
                             f"(with {self.strategy} the weights would need gathering to every machine)")

    @classmethod
    def from_params(cls, params: dict | None) -> DistributedSettings:
        """From `distributed:` in parameters.yml. A bare YAML `no` reads as false: it is taken as "no", because
        DVC's `-S` rewrite of a parameters file (every `qmllm seeds run`) drops the quotes around "no"."""
        params = dict(params or {})
        if params.get("mixed_precision") is False:
            params["mixed_precision"] = "no"
        return cls(**params)

    def as_dict(self) -> dict:
        return asdict(self)

    def checkpoint_fields(self) -> dict:
        """What a training checkpoint's fingerprint adds for these settings: nothing for one process in full
        precision (so the checkpoints of earlier runs stay valid), else the settings. The device is left out:
        a run stopped on one resumes on another."""
        if replace(self, device="auto") == DistributedSettings():
            return {}
        return {"distributed": {k: v for k, v in self.as_dict().items() if k != "device"}}

    @property
    def on_gpu(self) -> bool:
        """Whether the workers train on CUDA (the `device` setting resolved on this machine)."""
        return resolve_device(self.device).type == "cuda"


def make_accelerator(settings: DistributedSettings, batch_size: int = 1, grad_clip: float = 1.0):
    """An `Accelerator` for this process, with the strategy's plugin. Accelerate keeps its state in a
    process-wide singleton; it is reset first, so a forked worker never inherits its parent's and one
    process can train several models under different settings in turn."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    plugins = {}
    if settings.strategy == "fsdp" and settings.world_size > 1:
        from accelerate import FullyShardedDataParallelPlugin

        plugins["fsdp_plugin"] = FullyShardedDataParallelPlugin(auto_wrap_policy="transformer_based_wrap",
                                                                 use_orig_params=True)
    elif settings.strategy.startswith("deepspeed") and settings.world_size > 1:
        from accelerate import DeepSpeedPlugin

        plugins["deepspeed_plugin"] = DeepSpeedPlugin(zero_stage=int(settings.strategy[-1]),
                                                      gradient_clipping=grad_clip)
        plugins["deepspeed_plugin"].deepspeed_config["train_micro_batch_size_per_gpu"] = max(
            1, batch_size // settings.world_size)
    if settings.sharded and not settings.on_gpu:
        logger.warning("distributed.strategy %s on CPUs: Accelerate engages FSDP and DeepSpeed on accelerators "
                       "only, so the %d processes run as DDP (checkpoints still go through save_state)",
                       settings.strategy, settings.world_size)
    # the schedule steps once per optimiser step: the loop's steps are global batches, not one process's
    # share of a data loader (Accelerate's default steps it once per process)
    return Accelerator(mixed_precision=settings.mixed_precision, cpu=not settings.on_gpu,
                       step_scheduler_with_optimizer=False, **plugins)


def world() -> tuple[int, int]:
    """(rank, number of processes) of this process; (0, 1) outside a distributed run."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def rank_share(picks: list, generator: torch.Generator) -> tuple[list, torch.Generator]:
    """This process's share of a global batch `picks` drawn from the loop's `generator` (the same draw on
    every process), and the generator the rest of its step draws from. With one process: `picks` and
    `generator` as they are. With N: every N-th pick from the rank's own, and a generator of the rank's own,
    seeded from the shared one's state (a hash: nothing is drawn from it), so that the shared one stays in
    step across processes whatever each draws from its own, and draws the same global batches as one
    process does."""
    rank, size = world()
    if size == 1:
        return picks, generator
    digest = hashlib.sha256(generator.get_state().numpy().tobytes()).digest()
    return picks[rank::size], torch.Generator().manual_seed(int.from_bytes(digest[:7], "little") + rank)


def all_sum(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` summed over the processes (in place; as it is with one)."""
    if world()[1] > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def gathered(tensor: torch.Tensor, examples: int | None = None) -> torch.Tensor:
    """Every process's `tensor` (the same shape on each) along dim 0, in the order of the global batch they
    were shared from by `rank_share` (example i of rank r is global example i * N + r): with `examples` the
    rows are that many examples' blocks of equal size, interleaved back; without it, concatenated in rank
    order. As it is with one process."""
    size = world()[1]
    if size == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(size)]
    dist.all_gather(parts, tensor.contiguous())
    if examples is None:
        return torch.cat(parts)
    blocks = torch.stack([part.reshape(examples, -1, *tensor.shape[1:]) for part in parts], dim=1)
    return blocks.reshape(-1, *tensor.shape[1:])


def from_main(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` as the main process (rank 0) has it, on every process (in place; as it is with one)."""
    if world()[1] > 1:
        dist.broadcast(tensor, src=0)
    return tensor


def launch(function: Callable[[], None], settings: DistributedSettings, threads: int | None = None) -> None:
    """Run `function()` in `settings.num_processes` forked processes on this machine, joined before this
    returns; an exception in any of them is raised here. With several machines they join the processes the
    other machines' runs start, over TCP at `main_process_ip:port`. On CPUs the processes talk over gloo on the
    loopback (Accelerate's `debug_launcher` setup, with the port a setting); on GPUs Accelerate's
    `notebook_launcher` starts them, one per GPU. `threads`: torch threads per process (default: this
    process's count split between them, so that the processes together do not oversubscribe the cores; a
    forked process must not use more than one OpenMP pool's worth, or it hangs)."""
    from accelerate.utils import PrepareForLaunch, patch_environment
    from torch.multiprocessing import start_processes

    size = settings.num_processes
    per_process = threads or max(1, torch.get_num_threads() // size)

    def body():
        torch.set_num_threads(per_process)
        if dist.is_initialized():  # Accelerate's CPU debug launch sets no LOCAL_RANK: on one machine it is the rank
            os.environ.setdefault("LOCAL_RANK", str(dist.get_rank()))
        function()

    if settings.on_gpu:
        if torch.cuda.is_initialized():
            raise RuntimeError(
                f"distributed.num_processes {size} on GPUs forks its workers, and CUDA is already in use in this "
                "process (a node before this one put a model on the GPU); CUDA cannot be used in a forked child. "
                "Run the training pipelines before the others, each stage in a `kedro run` of its own (as `dvc "
                "repro` does: `kedro run --pipelines pretrain`, then finetune, then safety_map and evaluate)")
        from accelerate import notebook_launcher

        notebook_launcher(body, num_processes=size, mixed_precision=settings.mixed_precision,
                          use_port=str(settings.port), master_addr=settings.main_process_ip,
                          node_rank=settings.machine_rank, num_nodes=settings.num_machines)
        return
    if settings.num_machines > 1:
        _launch_machines(body, settings, per_process)
        return
    with tempfile.NamedTemporaryFile() as rendezvous, patch_environment(
            world_size=size, master_addr="127.0.0.1", master_port=str(settings.port),
            accelerate_mixed_precision=settings.mixed_precision, accelerate_debug_rdv_file=rendezvous.name,
            accelerate_use_cpu="yes", gloo_socket_ifname=os.environ.get("GLOO_SOCKET_IFNAME", "lo"),
            omp_num_threads=str(per_process)):  # else Accelerate sets its own count, and a forked OpenMP hangs
        start_processes(PrepareForLaunch(body, debug=True), args=(), nprocs=size, start_method="fork")


def _launch_machines(body: Callable[[], None], settings: DistributedSettings, threads: int) -> None:
    """This machine's share of a CPU run over several machines: its `num_processes` forked workers, each told
    its global rank, joining the process group over TCP (gloo) at `main_process_ip:port` (env://, as
    `torchrun` would tell them)."""
    from torch.multiprocessing import start_processes

    def worker(index: int) -> None:
        os.environ.update(RANK=str(settings.machine_rank * settings.num_processes + index), LOCAL_RANK=str(index),
                          LOCAL_WORLD_SIZE=str(settings.num_processes), WORLD_SIZE=str(settings.world_size),
                          MASTER_ADDR=settings.main_process_ip, MASTER_PORT=str(settings.port),
                          ACCELERATE_USE_CPU="yes", ACCELERATE_MIXED_PRECISION=settings.mixed_precision,
                          OMP_NUM_THREADS=str(threads))
        body()

    start_processes(worker, args=(), nprocs=settings.num_processes, start_method="fork")
