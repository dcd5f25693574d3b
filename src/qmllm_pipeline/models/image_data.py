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
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Subset

from qmllm_pipeline.loaders import BadInputError, open_image_checked, sha256_of, square
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
        if self.verify and sha256_of(Path(path)) != self.hashes[index]:
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
