"""A Hugging Face model directory (`save_pretrained` / `from_pretrained`) as a Kedro dataset.

Loading never touches the network (`local_files_only=True`) and reads weights through safetensors.
Saving writes the whole directory next to the target and swaps it in, so an interrupted save keeps the
previous model. In the `real` environment the same entries point at directories of real weights,
marked `read_only: true` so that no pipeline can overwrite them.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from kedro.io import AbstractDataset, DatasetError

from qmllm_pipeline.datasets.atomic import atomic_directory

# Files that make a directory a loadable model or tokenizer, by kind of class.
_MARKERS = {
    "tokenizer": ("tokenizer.json", "tokenizer_config.json"),
    "processor": ("preprocessor_config.json",),
    "model": ("config.json",),
}


def _import(class_path: str):
    module, _, name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        raise DatasetError(f"cannot import {class_path!r}") from None


class HFModelDirectoryDataset(AbstractDataset):
    """`type: qmllm_pipeline.datasets.HFModelDirectoryDataset`, `model_class: transformers.CLIPModel`."""

    def __init__(self, path: str, model_class: str, load_args: dict[str, Any] | None = None, read_only: bool = False,
                 metadata: dict[str, Any] | None = None):
        self._path = Path(path)
        self._model_class = model_class
        self._load_args = load_args or {}
        self._read_only = read_only
        self.metadata = metadata

    def _kind(self) -> str:
        if "Tokenizer" in self._model_class:
            return "tokenizer"
        return "processor" if "Processor" in self._model_class else "model"

    def _describe(self) -> dict[str, Any]:
        return {"path": str(self._path), "model_class": self._model_class, "read_only": self._read_only}

    def _exists(self) -> bool:
        return self._path.is_dir() and any((self._path / m).is_file() for m in _MARKERS[self._kind()])

    def load(self) -> Any:
        if not self._path.is_dir():
            raise DatasetError(f"{self._path}: model directory not found (train it, or point the catalogue "
                               "entry at a local directory of weights)")
        if not self._exists():
            expected = " or ".join(_MARKERS[self._kind()])
            raise DatasetError(f"{self._path}: not a saved {self._kind()} directory (no {expected})")
        cls = _import(self._model_class)
        args = {"local_files_only": True, **self._load_args}
        if self._kind() == "model":
            args.setdefault("use_safetensors", True)
        try:
            loaded = cls.from_pretrained(str(self._path), **args)
        except (OSError, ValueError) as error:
            raise DatasetError(f"{self._path}: cannot load as {self._model_class}: {error}") from None
        if self._kind() == "model":
            loaded.eval()
        return loaded

    def save(self, data: Any) -> None:
        if self._read_only:
            raise DatasetError(f"{self._path}: read-only model directory (real weights); not overwriting it")
        with atomic_directory(self._path) as staging:
            if self._kind() == "model":
                data.save_pretrained(staging, safe_serialization=True)
            else:
                data.save_pretrained(staging)
