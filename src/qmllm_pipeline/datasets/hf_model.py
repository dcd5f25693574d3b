"""A Hugging Face model directory (`save_pretrained` / `from_pretrained`) as a Kedro dataset.

Loading never touches the network (`local_files_only=True`) and reads weights through safetensors.
Saving writes the whole directory next to the target and swaps it in, so an interrupted save keeps the
previous model. In the `real` environment the same entries point at directories of real weights,
marked `read_only: true` so that no pipeline can overwrite them, and prepared for images as they load
(`prepare_for_images: <conversation format>`): a tokenizer gets `<image>`, a pad token and the format's chat
template, an LLM the embedding rows of the tokenizer at `tokenizer_path` so prepared (new rows: the mean of
the old), as LLaVA's builder does when it loads a base LLM.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from kedro.io import AbstractDataset, DatasetError

from qmllm_pipeline.files import atomic_directory

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
                 metadata: dict[str, Any] | None = None, prepare_for_images: str | None = None,
                 tokenizer_path: str | None = None):
        self._path = Path(path)
        self._model_class = model_class
        self._load_args = load_args or {}
        self._read_only = read_only
        self.metadata = metadata
        self._format = prepare_for_images
        self._tokenizer_path = Path(tokenizer_path) if tokenizer_path else None
        if prepare_for_images and self._kind() == "model" and self._tokenizer_path is None:
            raise DatasetError(f"{path}: an LLM prepared for images needs tokenizer_path, the tokenizer its "
                               "embeddings are sized to")

    def _kind(self) -> str:
        if "Tokenizer" in self._model_class:
            return "tokenizer"
        return "processor" if "Processor" in self._model_class else "model"

    def _describe(self) -> dict[str, Any]:
        return {"path": str(self._path), "model_class": self._model_class, "read_only": self._read_only,
                "prepare_for_images": self._format}

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
        if self._format and self._kind() == "tokenizer":
            _prepared(loaded, None, self._format, self._path)
        elif self._format and self._kind() == "model":
            from transformers import AutoTokenizer

            try:
                tokenizer = AutoTokenizer.from_pretrained(str(self._tokenizer_path), local_files_only=True)
            except (OSError, ValueError) as error:
                raise DatasetError(f"{self._tokenizer_path}: cannot load the tokenizer that sizes {self._path}'s "
                                   f"embeddings: {error}") from None
            _prepared(tokenizer, loaded, self._format, self._path)
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


def _prepared(tokenizer, llm, conversation_format: str, path: Path) -> None:
    from qmllm_pipeline.models.conversation import prepare_for_images

    try:
        prepare_for_images(tokenizer, llm, conversation_format)
    except ValueError as error:
        raise DatasetError(f"{path}: {error}") from None
