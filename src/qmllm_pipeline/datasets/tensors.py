"""A dict of named tensors as one safetensors file (cached features, projector and codebook weights)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from kedro.io import AbstractDataset, DatasetError
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from qmllm_pipeline.datasets.atomic import atomic_path


class SafetensorsDataset(AbstractDataset):
    """`dict[str, torch.Tensor]` <-> one `.safetensors` file, written atomically. Never unpickles."""

    def __init__(self, filepath: str, metadata: dict[str, Any] | None = None):
        self._filepath = Path(filepath)
        self.metadata = metadata

    def _describe(self) -> dict[str, Any]:
        return {"filepath": str(self._filepath)}

    def _exists(self) -> bool:
        return self._filepath.is_file()

    def load(self) -> dict[str, torch.Tensor]:
        if not self._filepath.is_file():
            raise DatasetError(f"{self._filepath}: file not found (has the pipeline that writes it run?)")
        try:
            return load_file(self._filepath)
        except (SafetensorError, OSError) as error:
            raise DatasetError(f"{self._filepath}: not a readable safetensors file ({error})") from None

    def save(self, data: dict[str, torch.Tensor]) -> None:
        tensors = {name: tensor.detach().contiguous().cpu() for name, tensor in data.items()}
        with atomic_path(self._filepath) as temporary:
            save_file(tensors, str(temporary))
