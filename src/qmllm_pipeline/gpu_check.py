"""The check to run the day a GPU is at hand (`qmllm gpu-check`): the smoke chain and the real fixture's chain,
each with 1 and N training processes, in temporary copies of the project, with the wall time and the peak GPU
memory in use (read from `nvidia-smi` while each runs, so the runs themselves are untouched).

What it measures is what the code does today: every node that runs a model follows the `device` setting
(`auto`: the GPU); the training nodes fork one worker per GPU (`models/distributed.py`). A forked child cannot
use CUDA once its parent has, so with N processes the chains run as DVC runs them, one `kedro run` per stage
(training stages first, their own model work on the CPU: `RunSettings.node_device`), never a node on the GPU
before a training node forks.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from qmllm_pipeline.data_scale import fixture_params, project_copy


def gpu_memory_mib() -> int | None:
    """Memory in use on every GPU together (MiB), from nvidia-smi; None without it."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return sum(int(line) for line in out.split() if line.strip().isdigit())


class PeakMemory:
    """Polls `gpu_memory_mib` in a thread while a command runs; `peak` is the most above the start."""

    def __init__(self, every: float = 0.5):
        self.every, self.start, self.peak = every, gpu_memory_mib() or 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self._stop.wait(self.every):
            used = gpu_memory_mib()
            if used is not None:
                self.peak = max(self.peak, used - self.start)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def _kedro(root: Path, *args: str) -> tuple[float, int]:
    """`kedro run ARGS` in `root`: (seconds, peak GPU MiB). Raises RuntimeError with the log's tail on failure."""
    started = time.perf_counter()
    with PeakMemory() as memory:
        done = subprocess.run([sys.executable, "-m", "kedro", "run", *args], cwd=root, capture_output=True,
                              text=True, env={**os.environ, "KEDRO_DISABLE_TELEMETRY": "true"})
    if done.returncode:
        raise RuntimeError(f"kedro run {' '.join(args)} failed in {root}:\n{done.stderr[-3000:]}")
    return time.perf_counter() - started, memory.peak


def check(project: Path, processes: int) -> list[dict]:
    """One row per chain and process count: seconds and peak GPU memory."""
    from qmllm_pipeline.fixtures import write_real_fixture

    rows = []
    for count in dict.fromkeys((1, processes)):
        distributed = f"distributed.num_processes={count},distributed.port={29500 + count}"
        with tempfile.TemporaryDirectory(prefix="gpu-check-smoke-") as folder:
            root = project_copy(project, Path(folder))
            shutil.copytree(project / "data/01_raw", root / "data/01_raw", dirs_exist_ok=True)
            _kedro(root, "--env", "smoke", "--pipelines", "data,foundation")
            seconds, peak = _chain(root, ["features", "pretrain", "finetune", "safety_map", "evaluate"] if count > 1
                                   else [""], "--env", "smoke", "--params", distributed)
            rows.append({"chain": "smoke (kedro run --env smoke)", "processes": count, "seconds": seconds,
                         "peak_gpu_mib": peak})
        with tempfile.TemporaryDirectory(prefix="gpu-check-real-") as folder:
            root = project_copy(project, Path(folder))
            write_real_fixture(root / "data/01_raw/real")
            params = f"{fixture_params(56, 2)},{distributed}"
            # features computed on read must run in the kedro run that trains on them; no node of these four
            # puts a model on the GPU outside training
            seconds, peak = _chain(root, ["ingest,features,pretrain,finetune", "safety_map", "evaluate"]
                                   if count > 1 else ["real"], "--env", "real", "--params", params)
            rows.append({"chain": "real fixture (kedro run --env real --pipelines real)", "processes": count,
                         "seconds": seconds, "peak_gpu_mib": peak})
    return rows


def _chain(root: Path, pipelines: list[str], *args: str) -> tuple[float, int]:
    """`kedro run --pipelines P ARGS` for each P in turn ("": the default pipeline): total seconds and the largest
    peak GPU MiB."""
    runs = [_kedro(root, *(("--pipelines", names) if names else ()), *args) for names in pipelines]
    return sum(seconds for seconds, _ in runs), max(peak for _, peak in runs)


def table(rows: list[dict]) -> str:
    lines = ["| chain | processes | seconds | peak GPU memory (MiB) |", "|---|---|---|---|"]
    lines += [f"| {r['chain']} | {r['processes']} | {r['seconds']:.0f} | {r['peak_gpu_mib']:,} |" for r in rows]
    return "\n".join(lines)
