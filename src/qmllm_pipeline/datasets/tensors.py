"""Named tensors as safetensors: one file (cached features, projector and codebook weights), or a folder of
row shards read lazily (a real corpus's features)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from kedro.io import AbstractDataset, DatasetError
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from qmllm_pipeline.datasets.atomic import _LocalFileDataset
from qmllm_pipeline.files import atomic_directory, atomic_path
from qmllm_pipeline.models.feature_shards import (
    ShardedFeatures,
    gather,
    is_computed_on_read,
    is_lazy,
    iterate,
    shard_name,
)


class SafetensorsDataset(_LocalFileDataset):
    """`dict[str, torch.Tensor]` <-> one `.safetensors` file, written atomically. Never unpickles. Lazy shards
    (`models/feature_shards.py`) are computed and concatenated into the one file."""

    def load(self) -> dict[str, torch.Tensor]:
        self._check_exists()
        try:
            return load_file(self._filepath)
        except (SafetensorError, OSError) as error:
            raise DatasetError(f"{self._filepath}: not a readable safetensors file ({error})") from None

    def save(self, data: dict[str, torch.Tensor]) -> None:
        tensors = {name: tensor.detach().contiguous().cpu() for name, tensor in gather(data).items()}
        with atomic_path(self._filepath) as temporary:
            save_file(tensors, str(temporary))


class ShardedSafetensorsDataset(AbstractDataset):
    """Row-aligned tensors <-> a folder of `shard-00000.safetensors`, ... Saving lazy shards computes and writes
    one at a time (memory: one shard), into a staging folder published as a unit when the last is written (a
    killed run leaves the previous folder whole). Loading reads the headers only: `ShardedFeatures`, whose
    columns read the rows a batch asks for. Never unpickles.

    Features computed on the fly (`image_data.TowerFeatures`, `features.cache: false`) are not written: they are
    held for the nodes of the same run, and loading them in another run is an error that says so."""

    def __init__(self, filepath: str, metadata: dict[str, Any] | None = None):
        self._path = Path(filepath)
        self.metadata = metadata
        self._on_the_fly = None  # features computed on read (`TowerFeatures`), held for this run

    def _describe(self) -> dict[str, Any]:
        return {"filepath": str(self._path)}

    def _exists(self) -> bool:
        return self._on_the_fly is not None or self._path.is_dir()

    def load(self) -> ShardedFeatures:
        if self._on_the_fly is not None:
            return self._on_the_fly
        if not self._path.is_dir():
            raise DatasetError(f"{self._path}: feature folder not found; run the features pipeline first (with "
                               "features.cache: false, in the same `kedro run` as the stage that reads them)")
        try:
            return ShardedFeatures(self._path)
        except (SafetensorError, OSError, ValueError) as error:
            raise DatasetError(f"{self._path}: not a readable folder of feature shards ({error})") from None

    def save(self, data) -> None:
        if is_computed_on_read(data):
            self._on_the_fly = data
            return
        self._on_the_fly = None
        shards = iterate(data) if is_lazy(data) else [data]
        with atomic_directory(self._path) as staging:
            for index, tensors in enumerate(shards):
                save_file({name: tensor.detach().contiguous().cpu() for name, tensor in tensors.items()},
                          str(staging / f"{shard_name(index)}.safetensors"))
