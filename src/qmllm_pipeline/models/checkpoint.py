"""Resumable training: a checkpoint folder with module weights (safetensors), optimiser, schedule and
random state (`torch.load(weights_only=True)`, never unpickling code), and the loss history so far.

A run stopped in the middle (Ctrl-C, a kill) continues from its last checkpoint when started again with
the same configuration; a checkpoint written under another configuration is ignored. Under several
training processes rank 0 alone writes it (`state.json` records the rank and process that did) and every
process reads it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from qmllm_pipeline.files import atomic_directory
from qmllm_pipeline.models.distributed import world

logger = logging.getLogger(__name__)


def fingerprint(config) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


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
            logger.warning("ignoring checkpoint %s: written under another configuration", self.directory)
            return None
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
                        "generator": generator.get_state()}, staging / "trainer.pt")
            (staging / "state.json").write_text(json.dumps(
                {"step": step, "fingerprint": self.fingerprint, "modules": list(modules), "history": history,
                 "written_by": {"rank": world()[0], "pid": os.getpid()}}))

    def clear(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)
