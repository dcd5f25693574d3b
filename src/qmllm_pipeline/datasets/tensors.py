"""A dict of named tensors as one safetensors file (cached features, projector and codebook weights)."""

from __future__ import annotations

import torch
from kedro.io import DatasetError
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from qmllm_pipeline.datasets.atomic import _LocalFileDataset
from qmllm_pipeline.files import atomic_path


class SafetensorsDataset(_LocalFileDataset):
    """`dict[str, torch.Tensor]` <-> one `.safetensors` file, written atomically. Never unpickles."""

    def load(self) -> dict[str, torch.Tensor]:
        self._check_exists()
        try:
            return load_file(self._filepath)
        except (SafetensorError, OSError) as error:
            raise DatasetError(f"{self._filepath}: not a readable safetensors file ({error})") from None

    def save(self, data: dict[str, torch.Tensor]) -> None:
        tensors = {name: tensor.detach().contiguous().cpu() for name, tensor in data.items()}
        with atomic_path(self._filepath) as temporary:
            save_file(tensors, str(temporary))
