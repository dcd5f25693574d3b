"""Local-file datasets that write atomically (temporary file in the same folder, then os.replace)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from kedro.io import AbstractDataset, DatasetError
from PIL import Image

from qmllm_pipeline.files import atomic_directory, atomic_path
from qmllm_pipeline.sealing import prune_copies, seal


class _LocalFileDataset(AbstractDataset):
    def __init__(self, filepath: str, metadata: dict[str, Any] | None = None):
        self._filepath = Path(filepath)
        self.metadata = metadata

    def _describe(self) -> dict[str, Any]:
        return {"filepath": str(self._filepath)}

    def _exists(self) -> bool:
        return self._filepath.is_file()

    def _check_exists(self) -> None:
        if not self._filepath.is_file():
            raise DatasetError(f"{self._filepath}: file not found (has the pipeline that writes it run?)")


class AtomicParquetDataset(_LocalFileDataset):
    """A pandas DataFrame as one Parquet file (pyarrow). List and struct columns round-trip."""

    def __init__(self, filepath: str, save_args: dict[str, Any] | None = None, metadata: dict[str, Any] | None = None):
        super().__init__(filepath, metadata)
        self._save_args = {"compression": "zstd", **(save_args or {})}

    def load(self) -> pd.DataFrame:
        self._check_exists()
        try:
            return pq.read_table(self._filepath).to_pandas()
        except (pa.ArrowInvalid, OSError) as error:
            raise DatasetError(f"{self._filepath}: not a readable Parquet file ({error})") from None

    def save(self, data: pd.DataFrame) -> None:
        table = pa.Table.from_pandas(data, preserve_index=False)
        with atomic_path(self._filepath) as temporary:
            pq.write_table(table, temporary, **self._save_args)


class AtomicJSONDataset(_LocalFileDataset):
    """A JSON document (metrics, reports), pretty-printed so that git diffs stay readable."""

    def load(self) -> Any:
        self._check_exists()
        try:
            return json.loads(self._filepath.read_text())
        except json.JSONDecodeError as error:
            where = f"line {error.lineno}, column {error.colno}"
            raise DatasetError(f"{self._filepath}: malformed JSON at {where}") from None

    def save(self, data: Any) -> None:
        with atomic_path(self._filepath) as temporary:
            temporary.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


class SealedManifestDataset(AtomicJSONDataset):
    """A guarded model's manifest (`guarded.json`), sealed as it is saved (`sealing.seal`): the model folder's
    files hard-linked into a sealed copy beside it (`sealed_copy`), and the SHA-256 of every file under each
    path of its `depends_on` (relative to the manifest's folder: the model directory and the foundation models
    it references) recorded under `files`. Loading it (`GuardedQMLLM.from_manifest`) refuses a model whose
    files changed since, or were never written together, and serves the sealed copy while a rerun rewrites
    the folder. Written last, after the files it seals; the copies of older seals are removed after it, all
    but the one it replaced."""

    def save(self, data: dict) -> None:
        if not isinstance(data, dict) or not isinstance(data.get("depends_on"), list):
            raise DatasetError(f"{self._filepath}: a sealed manifest needs a `depends_on` list of paths")
        missing = [p for p in data["depends_on"] if not (self._filepath.parent / p).exists()]
        if missing:
            raise DatasetError(f"{self._filepath}: cannot seal, {missing} not found beside it")
        model = str(data.get("model", "."))
        previous = self._sealed_copy()
        files, copy = seal(self._filepath, data["depends_on"], model)
        super().save({**data, "files": files, "sealed_copy": copy})
        prune_copies(self._filepath, model, keep={copy, previous} - {None})

    def _sealed_copy(self) -> str | None:
        """The copy the manifest in place names (None without one, or when it does not read)."""
        try:
            copy = json.loads(self._filepath.read_text()).get("sealed_copy")
        except (OSError, ValueError, AttributeError):
            return None
        return copy if isinstance(copy, str) else None


class AtomicImageDataset(_LocalFileDataset):
    """A Pillow image (plots, contact sheets) saved in the format its file suffix names."""

    def load(self) -> Image.Image:
        self._check_exists()
        with Image.open(self._filepath) as image:
            return image.copy()

    def save(self, data: Image.Image) -> None:
        with atomic_path(self._filepath) as temporary:
            data.save(temporary, format=Image.registered_extensions()[self._filepath.suffix.lower()])


class AtomicTextDataset(_LocalFileDataset):
    """A text document (the Markdown evaluation report)."""

    def load(self) -> str:
        self._check_exists()
        return self._filepath.read_text()

    def save(self, data: str) -> None:
        with atomic_path(self._filepath) as temporary:
            temporary.write_text(data)


class FileFolderDataset(AbstractDataset):
    """A folder of named files, `{file name: bytes}` (stage 2's LoRA adapter in peft's own layout:
    `adapter_config.json` and `adapter_model.safetensors`, which `PeftModel.from_pretrained` reads). Saved
    whole into a staging folder and swapped in; an empty dict writes an empty folder (nothing to keep)."""

    def __init__(self, path: str, metadata: dict[str, Any] | None = None):
        self._path = Path(path)
        self.metadata = metadata

    def _describe(self) -> dict[str, Any]:
        return {"path": str(self._path)}

    def _exists(self) -> bool:
        return self._path.is_dir()

    def load(self) -> dict[str, bytes]:
        if not self._path.is_dir():
            raise DatasetError(f"{self._path}: folder not found (run the pipeline that writes it)")
        return {p.name: p.read_bytes() for p in sorted(self._path.iterdir()) if p.is_file()}

    def save(self, data: dict[str, bytes]) -> None:
        bad = [name for name in data if Path(name).name != name or name.startswith(".")]
        if bad:
            raise DatasetError(f"{self._path}: file names must be plain names, got {bad}")
        with atomic_directory(self._path) as staging:
            for name, content in data.items():
                (staging / name).write_bytes(content)
