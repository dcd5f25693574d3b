"""Sealing a guarded model: the SHA-256 of every file it reads, and a sealed copy of its folder that a later
run cannot change. Plain Python (no Kedro, no torch): `datasets.SealedManifestDataset` seals,
`models.guarded.GuardedQMLLM.from_manifest` verifies.

The model folder (`data/06_models/qmllm`) is written by three stages in turn (stage-1 weights, the LLM, the
safety map), so a rerun killed between two of them leaves a mixture there. Sealing therefore hard-links the
folder's files into `.sealed-<folder>-<id>` beside it (the same depth, so its relative references to the
foundation models still hold). The writers replace a file by renaming a new one onto its name, which leaves
the copy's link to the old content alone: the copy keeps exactly what was sealed, at no cost in disk space
until a file is replaced. A file changed in place changes both, and then neither verifies: nothing unsealed
is ever served. The foundation folders a model references lie outside it and are sealed by their hashes only.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from qmllm_pipeline.files import _umask, sha256_file, tree_files

COPY_PREFIX = ".sealed-"


def _inside(path: Path, folder: Path) -> bool:
    path, folder = os.path.abspath(path), os.path.abspath(folder)
    return os.path.commonpath([path, folder]) == folder


def sealed_files(manifest: Path, depends_on: list[str], model: str, copy: Path | None = None) -> dict[str, Path]:
    """Where each file of the seal lies: its key (relative to the manifest's folder) -> the live file, or, with
    a sealed `copy`, the copy's file for those inside the model folder."""
    root, model_dir = manifest.parent, Path(os.path.normpath(manifest.parent / model))
    live = tree_files(root, depends_on, exclude=(manifest.name,))
    if copy is None:
        return live
    found = {key: path for key, path in live.items() if not _inside(path, model_dir)}
    inside = [os.path.relpath(root / entry, model_dir) for entry in depends_on if _inside(root / entry, model_dir)]
    excluded = os.path.relpath(manifest, model_dir)
    for relative, path in tree_files(copy, inside, exclude=(excluded,)).items():
        found[Path(os.path.normpath(os.path.relpath(model_dir / relative, root))).as_posix()] = path
    return dict(sorted(found.items()))


def seal(manifest: Path, depends_on: list[str], model: str) -> tuple[dict[str, str], str]:
    """Hard-link the model folder's files into a sealed copy beside it and hash what the seal covers (the
    copy's files, the references' live ones). Returns the hashes by key and the copy's path relative to the
    manifest's folder. Sealing the same content again finds its copy already there."""
    root, model_dir = manifest.parent, Path(os.path.normpath(manifest.parent / model))
    staging = Path(tempfile.mkdtemp(prefix=f".{model_dir.resolve().name}.", dir=model_dir.resolve().parent))
    try:
        for path in tree_files(root, depends_on, exclude=(manifest.name,)).values():
            if _inside(path, model_dir):
                linked = staging / os.path.relpath(path, model_dir)
                linked.parent.mkdir(parents=True, exist_ok=True)
                try:
                    os.link(path, linked)
                except OSError:  # another filesystem, or links not allowed: a real copy
                    shutil.copy2(path, linked)
        files = {key: sha256_file(path) for key, path in sealed_files(manifest, depends_on, model, staging).items()}
        name = f"{COPY_PREFIX}{model_dir.resolve().name}-{hashlib.sha256(json.dumps(files).encode()).hexdigest()[:12]}"
        copy = model_dir.resolve().parent / name
        if not copy.exists():
            os.chmod(staging, 0o777 & ~_umask())  # mkdtemp makes it private
            staging.rename(copy)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return files, Path(os.path.relpath(model_dir.parent / name, root)).as_posix()


def prune_copies(manifest: Path, model: str, keep: set[str]) -> None:
    """Remove the model folder's sealed copies except those named in `keep` (relative to the manifest's
    folder): the one the manifest names now and the one it named before (a reader may still be loading it)."""
    model_dir = Path(os.path.normpath(manifest.parent / model)).resolve()
    kept = {(manifest.parent / name).resolve() for name in keep}
    for copy in model_dir.parent.glob(f"{COPY_PREFIX}{model_dir.name}-*"):
        if copy.resolve() not in kept:
            shutil.rmtree(copy, ignore_errors=True)
