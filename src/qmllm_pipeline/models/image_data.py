"""The images of a scene table as a torch `Dataset`: decoded one at a time, by DataLoader workers when asked.

A table carries its images one of two ways (`qmllm_pipeline.schema`):

- embedded: `image` holds PNG bytes (the default world's small tables, D_map and the evaluation sets);
- a manifest: `image_path`, `image_sha256` and `image_size` (real captions and dialogs: the pixels stay on
  disk; `ingest` checked each file and recorded its hash, and `image_size` is the square CLIP reads, 0 for
  the image as it is).

Both go through `SceneImages`, so the default world and real data share one path from table to pixels.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Subset

from qmllm_pipeline.files import sha256_file
from qmllm_pipeline.loaders import BadInputError, open_image_checked, square
from qmllm_pipeline.models.clip import pixel_values

MANIFEST_COLUMNS = ("image_path", "image_sha256", "image_size")


def is_manifest(table: pd.DataFrame) -> bool:
    """Whether `table` refers to its images on disk rather than holding them."""
    return "image" not in table.columns and "image_path" in table.columns


class SceneImages(Dataset):
    """Item i: row i's image as CLIP's normalised pixels (3, H, W), as `clip.png_pixel_values` computes them
    for a batch. A manifest's file is checked against its recorded hash as it is read (`verify`), so a file
    changed since `ingest` stops the run with its path instead of training on other pixels."""

    def __init__(self, table: pd.DataFrame, processor, max_pixels: int = 89_478_485, verify: bool = True):
        self.processor, self.max_pixels, self.verify = processor, max_pixels, verify
        if is_manifest(table):
            self.paths = list(table["image_path"])
            self.hashes = list(table["image_sha256"])
            self.sizes = [int(size) for size in table["image_size"]]
            self.pngs = None
        else:
            self.pngs = list(table["image"])

    def __len__(self) -> int:
        return len(self.pngs) if self.pngs is not None else len(self.paths)

    def image(self, index: int) -> Image.Image:
        """Row `index`'s image, RGB, at the size CLIP's processor is handed."""
        if self.pngs is not None:
            return Image.open(io.BytesIO(self.pngs[index])).convert("RGB")
        path = self.paths[index]
        if self.verify and sha256_file(path) != self.hashes[index]:
            raise BadInputError(path, "changed since ingest (its sha256 differs from the manifest's); run "
                                      "`kedro run --env real --pipelines ingest` again")
        return square(open_image_checked(path, self.max_pixels), self.sizes[index] or None)

    def __getitem__(self, index: int) -> torch.Tensor:
        array = torch.from_numpy(np.array(self.image(index))).permute(2, 0, 1)
        return pixel_values(array[None], self.processor)[0]


def image_loader(images: SceneImages, rows: range, batch_size: int, num_workers: int = 0) -> DataLoader:
    """Batches of `images`' pixels over `rows`, in order; decoded by `num_workers` processes (0: in this one)."""
    return DataLoader(Subset(images, rows), batch_size=batch_size, shuffle=False, num_workers=num_workers,
                      persistent_workers=False, pin_memory=torch.cuda.is_available())


class TowerColumn:
    """One feature (`cls`, `head_cls` or `patches`) of a `TowerFeatures`, indexed like a tensor of every row."""

    def __init__(self, source: TowerFeatures, key: str):
        self.source, self.key = source, key
        self.modules = (source.tower,)  # what reading it runs (`feature_shards.modules_of`)
        self.shape = torch.Size((len(source.images), *source.row_shapes[key]))
        self.dtype = source.dtype

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows) -> torch.Tensor:
        if isinstance(rows, int):
            return self[torch.tensor([rows])][0]
        if isinstance(rows, slice):
            rows = torch.arange(len(self))[rows]
        return self.source.rows(torch.as_tensor(rows, dtype=torch.long).reshape(-1))[self.key]

    def float(self) -> torch.Tensor:
        return self[:].float()


class TowerFeatures(Mapping[str, TowerColumn]):
    """A table's vision features computed when a batch asks for them, LLaVA's way (`features.cache: false`):
    the rows' images decoded (`threads` at once), one pass of the frozen tower, the CLS token from each source
    and the patch features, cast to the cache's `dtype` as a cached run would read them. Its columns `cls`,
    `head_cls` and `patches` index like tensors of every row; the last request is kept, so the three columns
    of one batch share one pass. Nothing is written: what a corpus costs is its images on disk."""

    computed_on_read = True  # `feature_shards.is_computed_on_read`: datasets hold it for the run, never write it

    def __init__(self, images: SceneImages, tower, cls_source: str, head_cls_source: str,
                 dtype: torch.dtype = torch.float16, batch_size: int = 256, threads: int = 0):
        self.images, self.tower, self.dtype = images, tower.eval(), dtype
        self.sources = {"cls": cls_source, "head_cls": head_cls_source}
        self.batch_size, self.threads = batch_size, threads
        self._last: tuple[tuple[int, ...], dict[str, torch.Tensor]] | None = None
        first = self.rows(torch.tensor([0])) if len(images) else {}
        self.row_shapes = {key: tuple(value.shape[1:]) for key, value in first.items()}
        self.columns = {key: TowerColumn(self, key) for key in self.row_shapes}

    def __getitem__(self, key: str) -> TowerColumn:
        return self.columns[key]

    def __iter__(self):
        return iter(self.columns)

    def __len__(self) -> int:
        return len(self.columns)

    def __deepcopy__(self, memo) -> TowerFeatures:
        return self  # a recipe over frozen models and files: copies would only cost memory

    @torch.no_grad()
    def rows(self, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        """`cls`, `head_cls` and `patches` of `rows` (in their order; repeats allowed)."""
        key = tuple(rows.tolist())
        if self._last is not None and self._last[0] == key:
            return self._last[1]
        if len(rows) and (rows.min() < -len(self.images) or rows.max() >= len(self.images)):
            raise IndexError(f"rows out of range for {len(self.images)} images")
        parts: dict[str, list[torch.Tensor]] = {"cls": [], "head_cls": [], "patches": []}
        device = next(self.tower.parameters()).device
        for start in range(0, len(key), self.batch_size):
            chunk = key[start:start + self.batch_size]
            if self.threads:
                with ThreadPoolExecutor(self.threads) as pool:
                    pixels = list(pool.map(self.images.__getitem__, chunk))
            else:
                pixels = [self.images[row] for row in chunk]
            cls_features, patches = self.tower.features(torch.stack(pixels).to(device),
                                                        tuple(dict.fromkeys(self.sources.values())))
            for name, source in self.sources.items():
                parts[name].append(cls_features[source].to(self.dtype))
            parts["patches"].append(patches.to(self.dtype))
        out = {name: torch.cat(values) for name, values in parts.items()}
        self._last = (key, out)
        return out
