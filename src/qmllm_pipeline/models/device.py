"""Where the models run: one `device` setting (conf/base/parameters.yml) that every node running a model follows.

`auto` (the default) is CUDA when torch sees a GPU, else the CPU; `cpu`, `cuda` or `cuda:N` pin it. The
rule every model-running function keeps: its inputs come in on the CPU, it moves them to the model's device
(`module_device`), and whatever leaves it for bookkeeping (scores, codes, losses an attack ranks, features to
save) goes back to the CPU. Random draws stay on CPU generators, so a run draws the same noise, batches and
restarts on any device; on the CPU every `.to(device)` is a no-op and the figures are bit-identical to a run
without this setting.
"""

from __future__ import annotations

import torch


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """The torch device `name` stands for: `auto` -> CUDA when available, else the CPU. A device this machine
    does not have is an error that says so, never a silent fall-back."""
    if isinstance(name, torch.device):
        device = name
    elif str(name) == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    else:
        try:
            device = torch.device(str(name))
        except RuntimeError:
            raise ValueError(f"device: {name!r} is not a torch device (auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {name!r}, but torch sees no CUDA device here (set device: auto or cpu)")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device: {name!r}: only cpu and cuda are supported")
    return device


def module_device(module: torch.nn.Module) -> torch.device:
    """The device of a module's first parameter (a module without parameters: its first buffer, else the CPU)."""
    for tensor in (*module.parameters(), *module.buffers()):
        return tensor.device
    return torch.device("cpu")


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA runs asynchronously: a timer must wait for it); a no-op on the
    CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
