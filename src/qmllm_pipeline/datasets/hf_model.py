"""A Hugging Face model directory (`save_pretrained` / `from_pretrained`) as a Kedro dataset.

Loading never touches the network (`local_files_only=True`) and reads weights through safetensors.
Saving writes the whole directory next to the target and swaps it in, so an interrupted save keeps the
previous model. In the `real` environment the same entries point at directories of real weights,
marked `read_only: true` so that no pipeline can overwrite them, and prepared for images as they load
(`prepare_for_images: <conversation format>`): a tokenizer gets `<image>`, a pad token and the format's chat
template, an LLM the embedding rows of the tokenizer at `tokenizer_path` so prepared (new rows: the mean of
the old), as LLaVA's builder does when it loads a base LLM.

An LLM that stage 2 trained with LoRA is saved, under `adapter_of: {base, tokenizer, conversation_format}`, as a pointer
(`adapted_llm.json`: the base, prepared for images, plus the `lora_adapter` folder beside it) instead of a
merged copy; loading merges them again. Without `adapter_of`, or for an LLM trained in full, the weights.
"""

from __future__ import annotations

import importlib
import logging
import os
from pathlib import Path
from typing import Any

from kedro.io import AbstractDataset, DatasetError

from qmllm_pipeline.files import atomic_directory
from qmllm_pipeline.models.lora import ADAPTED_FILE, adapted_from, load_adapted_llm, write_adapted_pointer

logger = logging.getLogger(__name__)

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
                 tokenizer_path: str | None = None, adapter_of: dict[str, str] | None = None):
        self._path = Path(path)
        self._adapter_of = adapter_of
        if adapter_of is not None and set(adapter_of) != {"base", "tokenizer", "conversation_format"}:
            raise DatasetError(f"{path}: adapter_of needs exactly `base` (the base LLM's folder), `tokenizer` (the "
                               "tokenizer it is prepared with) and `conversation_format`, got "
                               f"{sorted(adapter_of)}")
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
        markers = (*_MARKERS[self._kind()], *((ADAPTED_FILE,) if self._kind() == "model" else ()))
        return self._path.is_dir() and any((self._path / m).is_file() for m in markers)

    def load(self) -> Any:
        if not self._path.is_dir():
            raise DatasetError(f"{self._path}: model directory not found (train it, or point the catalogue "
                               "entry at a local directory of weights)")
        if not self._exists():
            expected = " or ".join(_MARKERS[self._kind()])
            raise DatasetError(f"{self._path}: not a saved {self._kind()} directory (no {expected})")
        if self._kind() == "model" and (self._path / ADAPTED_FILE).is_file():
            try:
                return load_adapted_llm(self._path)
            except (OSError, ValueError) as error:
                raise DatasetError(str(error)) from None
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
        adapter = adapted_from(data) if self._adapter_of and self._kind() == "model" else None
        with atomic_directory(self._path) as staging:
            if adapter is not None:
                base, tokenizer = (os.path.relpath(self._adapter_of[key], self._path) for key in ("base", "tokenizer"))
                dtype = self._load_args.get("dtype")
                write_adapted_pointer(staging, base, adapter, tokenizer, self._adapter_of["conversation_format"],
                                      str(dtype).removeprefix("torch.") if dtype else None)
                logger.info("%s: the base LLM plus %s (LoRA), not a merged copy", self._path, adapter)
            elif self._kind() == "model":
                data.save_pretrained(staging, safe_serialization=True)
            else:
                data.save_pretrained(staging)


def _prepared(tokenizer, llm, conversation_format: str, path: Path) -> None:
    from qmllm_pipeline.models.conversation import prepare_for_images

    try:
        prepare_for_images(tokenizer, llm, conversation_format)
    except ValueError as error:
        raise DatasetError(f"{path}: {error}") from None
