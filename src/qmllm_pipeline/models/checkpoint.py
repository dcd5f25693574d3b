"""Resumable training: a checkpoint folder with module weights (safetensors), optimiser, schedule and
random state (`torch.load(weights_only=True)`, never unpickling code), and the loss history so far.

A run stopped in the middle (Ctrl-C, a kill) continues from its last checkpoint when started again with
the same configuration and the same data, bit for bit (the loop's generator and torch's global random state
are both kept); a checkpoint written under another configuration, or on other data (`data_digest`: rebuilt
features, a changed corpus), is ignored. Under several training processes rank 0 alone
writes it (`state.json` records the rank and process that did) and every process reads it.

Under a sharded strategy (FSDP, DeepSpeed ZeRO) no process holds the whole weights or optimiser state, so the
checkpoint is Accelerate's own (`Accelerator.save_state` / `load_state`, written by every process into
`accelerate/`: the shards, the optimiser and schedule, each process's random states) beside the same
`state.json` and the loop's generator. Accelerate reads it back with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from qmllm_pipeline.files import atomic_directory, publish_directory, sha256_file
from qmllm_pipeline.models.distributed import world
from qmllm_pipeline.models.feature_shards import FeatureColumn

logger = logging.getLogger(__name__)
ACCELERATE = "accelerate"  # state.json's format of a checkpoint written by Accelerate (sharded strategies)


def fingerprint(config) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def data_digest(*parts) -> str:
    """A SHA-256 over training data itself, for a checkpoint's fingerprint: tensors' bytes (with dtype and
    shape), the shard files behind a `FeatureColumn` (each file hashed once per process), token lists, and
    dataclasses and mappings of these. The settings alone cannot tell that the features were rebuilt or a
    corpus changed; resuming a checkpoint trained on other data would mix the two silently."""
    digest = hashlib.sha256()
    _update(digest, parts)
    return digest.hexdigest()[:16]


_FILE_DIGESTS: dict[tuple[str, int, int, int], str] = {}


def _update(digest, item) -> None:
    if isinstance(item, torch.Tensor):
        tensor = item.detach().cpu().contiguous()
        digest.update(f"T{tensor.dtype}{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(item, FeatureColumn):
        digest.update(f"C{item.key}{tuple(item.shape)}{item.dtype}".encode())
        for file in item.files:
            stat = os.stat(file)
            key = (str(file), stat.st_ino, stat.st_size, stat.st_mtime_ns)  # features are written by renaming
            if key not in _FILE_DIGESTS:
                _FILE_DIGESTS[key] = sha256_file(file)
            digest.update(_FILE_DIGESTS[key].encode())
    elif dataclasses.is_dataclass(item) and not isinstance(item, type):
        digest.update(type(item).__name__.encode())
        for field in dataclasses.fields(item):
            digest.update(field.name.encode())
            _update(digest, getattr(item, field.name))
    elif isinstance(item, Mapping):
        for key in sorted(item, key=str):
            digest.update(f"K{key}".encode())
            _update(digest, item[key])
    elif isinstance(item, list | tuple):
        try:  # token lists and examples: one C call
            digest.update(b"J" + json.dumps(item).encode())
        except TypeError:
            digest.update(f"L{len(item)}".encode())
            for element in item:
                _update(digest, element)
    else:
        digest.update(f"V{item!r}".encode())


def global_random_state() -> dict[str, torch.Tensor | list[torch.Tensor]]:
    """torch's global random state (and each GPU's, once CUDA is in use): what k-means and the dead-code
    restarts draw from, beside the loop's own generator. A resume that skips it diverges at the next draw."""
    state = {"torch_rng": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda_rng"] = torch.cuda.get_rng_state_all()
    return state


def set_global_random_state(state: dict) -> None:
    """Put back what `global_random_state` saved (a checkpoint from before it was saved has none)."""
    if "torch_rng" in state:
        torch.set_rng_state(state["torch_rng"])
    if "cuda_rng" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])


class TrainingCheckpoint:
    def __init__(self, directory: str | Path, config):
        self.directory = Path(directory)
        self.fingerprint = fingerprint(config)

    def load(self) -> dict | None:
        state_file = self.directory / "state.json"
        if not state_file.is_file():
            return None
        state = json.loads(state_file.read_text())
        if state.get("fingerprint") != self.fingerprint:
            logger.warning("ignoring checkpoint %s: written under another configuration or on other data",
                           self.directory)
            return None
        if state.get("format") == ACCELERATE:
            generator = load_file(self.directory / "generator.safetensors")["state"]
            return {**state, "accelerate_dir": self.directory / ACCELERATE, "generator": generator}
        modules = {}
        for name in state["modules"]:
            modules[name] = load_file(self.directory / f"{name}.safetensors")
        trainer = torch.load(self.directory / "trainer.pt", weights_only=True)
        return {**state, "module_states": modules, **trainer}

    def save(self, step: int, modules: dict, optimizer, schedule, generator: torch.Generator, history: dict) -> None:
        with atomic_directory(self.directory) as staging:
            for name, module in modules.items():
                tensors = {k: v.detach().contiguous().clone() for k, v in module.state_dict().items()}
                save_file(tensors, staging / f"{name}.safetensors")
            torch.save({"optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
                        "generator": generator.get_state(), **global_random_state()}, staging / "trainer.pt")
            (staging / "state.json").write_text(json.dumps(
                {"step": step, "fingerprint": self.fingerprint, "modules": list(modules), "history": history,
                 "written_by": {"rank": world()[0], "pid": os.getpid()}}))

    def save_sharded(self, step: int, accelerator, generator: torch.Generator, history: dict) -> None:
        """Every process calls this at the same step: Accelerate writes the prepared model's shards, optimiser,
        schedule and random states into a staging folder (each process its part), then the main process adds
        the generator and `state.json` and swaps the folder in for the last checkpoint, whole."""
        staging = self.directory.with_name(f".{self.directory.name}.staging")
        if accelerator.is_main_process:
            shutil.rmtree(staging, ignore_errors=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(staging / ACCELERATE))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            save_file({"state": generator.get_state()}, staging / "generator.safetensors")
            (staging / "state.json").write_text(json.dumps(
                {"step": step, "fingerprint": self.fingerprint, "format": ACCELERATE, "modules": [],
                 "history": history, "written_by": {"rank": world()[0], "pid": os.getpid()}}))
            publish_directory(staging, self.directory)
        accelerator.wait_for_everyone()

    def clear(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)
