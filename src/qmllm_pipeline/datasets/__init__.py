"""Custom Kedro datasets, all in one place.

Every file here is written to a temporary file in the target folder and renamed into place, so a run
that fails half-way (bad input, Ctrl-C, a full disk) never leaves a half-written file behind, and the
previous good version stays readable until the new one is complete.
"""

from qmllm_pipeline.datasets.atomic import (
    AtomicImageDataset,
    AtomicJSONDataset,
    AtomicParquetDataset,
    AtomicTextDataset,
    FileFolderDataset,
    SealedManifestDataset,
    atomic_directory,
    atomic_path,
)
from qmllm_pipeline.datasets.hf_model import HFModelDirectoryDataset
from qmllm_pipeline.datasets.tensors import SafetensorsDataset, ShardedSafetensorsDataset

__all__ = ["AtomicImageDataset", "AtomicJSONDataset", "AtomicParquetDataset", "AtomicTextDataset",
           "FileFolderDataset", "HFModelDirectoryDataset", "SealedManifestDataset",
           "SafetensorsDataset", "ShardedSafetensorsDataset", "atomic_directory", "atomic_path"]
