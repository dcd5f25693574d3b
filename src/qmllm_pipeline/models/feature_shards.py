"""Row-aligned feature tensors (`cls`, `head_cls`, `patches`, one row per image) that need not fit in memory.

The `features` nodes return their output as *lazy shards*: a dict of shard name -> zero-argument callable that
computes that shard's rows when called (Kedro's convention for lazily saved partitions). Whoever receives them
decides what they become:

- `ShardedSafetensorsDataset` (the real environment) calls them one at a time and writes each to its own
  `shard-00000.safetensors`, so no more than one shard is ever in memory; loading gives `ShardedFeatures`,
  whose columns read only the rows a batch asks for.
- `SafetensorsDataset` (the default world, a few thousand small images) and an in-memory run concatenate them
  (`gather`) into one dict of tensors, as before.

Readers (`Stage1Data`, `Stage2Data`, the heads) index a column with a batch's rows (`column[rows]`), slice it
and ask its `shape` and `len`, which a tensor and a `FeatureColumn` both answer.

Why not kedro-datasets' `PartitionedDataset`: it saves lazy partitions the same way, but its load hands back one
callable per partition that loads the whole shard, so a random batch would load every shard it touches, and
its overwrite deletes the old partitions before the new ones are written (a killed run leaves neither).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import torch
from safetensors import safe_open

Shards = dict[str, Callable[[], dict[str, torch.Tensor]]]
SHARD_PATTERN = "shard-*.safetensors"


def shard_name(index: int) -> str:
    return f"shard-{index:05d}"


def is_lazy(features) -> bool:
    """Whether `features` are lazy shards (a dict of callables) rather than tensors or `ShardedFeatures`."""
    return isinstance(features, dict) and bool(features) and all(callable(v) for v in features.values())


def is_computed_on_read(features) -> bool:
    """Whether `features` are computed when their rows are read (`image_data.TowerFeatures`), not stored."""
    return bool(getattr(features, "computed_on_read", False))


def modules_of(*columns) -> tuple[torch.nn.Module, ...]:
    """The modules that reading `columns` runs (a column computed on read names them in `modules`; stored ones
    have none), each once: what a training loop moves to its device beside the model."""
    found = {id(module): module for column in columns for module in getattr(column, "modules", ())}
    return tuple(found.values())


def iterate(shards: Shards) -> Iterator[dict[str, torch.Tensor]]:
    """Each shard's tensors in shard-name order, computed one at a time."""
    for name in sorted(shards):
        yield shards[name]()


def gather(features) -> Mapping[str, torch.Tensor]:
    """Lazy shards concatenated into one dict of tensors (computing each); tensors or `ShardedFeatures` as
    they are."""
    if not is_lazy(features):
        return features
    parts: dict[str, list[torch.Tensor]] = {}
    for shard in iterate(features):
        for key, tensor in shard.items():
            parts.setdefault(key, []).append(tensor)
    return {key: torch.cat(tensors) for key, tensors in parts.items()}


class FeatureColumn:
    """One feature of every row, read from the shard files a batch needs (each opened, its rows copied out,
    and closed again: nothing else stays in memory)."""

    def __init__(self, files: list[Path], key: str, counts: list[int], row_shape: tuple[int, ...],
                 dtype: torch.dtype):
        self.files, self.key, self.row_shape, self.dtype = files, key, row_shape, dtype
        self.starts = torch.tensor([0, *counts]).cumsum(0)
        self.shape = torch.Size((int(self.starts[-1]), *row_shape))

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows) -> torch.Tensor:
        if isinstance(rows, slice):
            rows = torch.arange(len(self))[rows]
        elif isinstance(rows, int):
            return self[torch.tensor([rows])][0]
        rows = torch.as_tensor(rows, dtype=torch.long).reshape(-1)
        if len(rows) and (rows.min() < -len(self) or rows.max() >= len(self)):
            raise IndexError(f"{self.key}: rows out of range for {len(self)} rows ({self.files[0].parent})")
        rows = rows % max(len(self), 1)
        out = torch.empty((len(rows), *self.row_shape), dtype=self.dtype)
        shard_of = torch.searchsorted(self.starts, rows, right=True) - 1
        for shard in shard_of.unique().tolist():
            positions = (shard_of == shard).nonzero().flatten()
            local = rows[positions] - self.starts[shard]
            with safe_open(str(self.files[shard]), framework="pt") as handle:
                view = handle.get_slice(self.key)
                low, high = int(local.min()), int(local.max()) + 1
                if high - low <= 4 * len(local):  # one read of the span covering the rows
                    out[positions] = view[low:high][local - low]
                else:
                    for position, row in zip(positions.tolist(), local.tolist(), strict=True):
                        out[position] = view[row:row + 1][0]
        return out

    def float(self) -> torch.Tensor:
        """Every row, in float32 (a reader that wants the whole column says so)."""
        return self[:].float()


class ShardedFeatures(Mapping[str, FeatureColumn]):
    """The shards of a folder (`shard-*.safetensors`, each holding the same keys for consecutive rows) as one
    mapping of key -> `FeatureColumn`. Only the headers are read when it opens."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.files = sorted(self.folder.glob(SHARD_PATTERN))
        if not self.files:
            raise FileNotFoundError(f"{self.folder}: no {SHARD_PATTERN} files")
        counts, layout = [], None
        for file in self.files:
            with safe_open(str(file), framework="pt") as handle:
                shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}  # noqa: SIM118
                dtypes = {key: handle.get_slice(key).get_dtype() for key in shapes}
            rows = {shape[0] for shape in shapes.values()}
            this = {key: (shape[1:], dtypes[key]) for key, shape in shapes.items()}
            if len(rows) != 1 or (layout is not None and this != layout):
                raise ValueError(f"{file}: its tensors do not line up with the other shards' ({shapes})")
            layout = this
            counts.append(rows.pop())
        self.columns = {key: FeatureColumn(self.files, key, counts, row_shape, _DTYPES[dtype])
                        for key, (row_shape, dtype) in layout.items()}

    def __getitem__(self, key: str) -> FeatureColumn:
        return self.columns[key]

    def __iter__(self):
        return iter(self.columns)

    def __len__(self) -> int:
        return len(self.columns)


_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "U8": torch.uint8, "BOOL": torch.bool}
