"""Files written atomically: a temporary file or folder beside the target, renamed onto it only once it is
complete, so an interrupted write never leaves a half file over an earlier result. Plain Python (no Kedro):
the Kedro datasets (`datasets/atomic.py`) and the training checkpoints (`models/checkpoint.py`) both use it."""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to `target`; on success rename it onto `target`, else delete it."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(handle)
    temporary = Path(temporary)
    try:
        yield temporary
        os.chmod(temporary, 0o666 & ~_umask())  # mkstemp creates 0600; give the file normal permissions
        os.replace(temporary, target)
    finally:
        temporary.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_directory(target: str | Path) -> Iterator[Path]:
    """Yield an empty staging folder next to `target`; on success swap it in for `target` (the old one is
    renamed aside first and deleted last), else delete it and leave `target` as it was."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        yield staging
        publish_directory(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def publish_directory(staging: str | Path, target: str | Path) -> None:
    """Swap a complete `staging` folder in for `target` (the old one renamed aside first and deleted last), with
    normal permissions: a reader sees the old folder or the new one, never a mixture."""
    staging, target = Path(staging), Path(target)
    mode = ~_umask()  # mkdtemp and mkstemp make private entries; give the result normal permissions
    for path in (staging, *staging.rglob("*")):
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & mode)
    previous = target.with_name(f".{target.name}.previous")
    if target.exists():
        shutil.rmtree(previous, ignore_errors=True)
        target.rename(previous)
    staging.rename(target)
    shutil.rmtree(previous, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def sha256_file(path: str | Path) -> str:
    """The file's SHA-256, read a megabyte at a time."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def tree_files(root: str | Path, paths: list[str], exclude: tuple[str, ...] = ()) -> dict[str, Path]:
    """Every file under each of `paths` (files or folders, relative to `root`), keyed by its path relative to
    `root` (posix, `..` where it lies outside), sorted; hidden entries (leftovers of atomic writes, sealed
    copies) and the names in `exclude` (relative to `root`) left out."""
    root = Path(root)
    found: dict[str, Path] = {}
    for entry in paths:
        target = root / entry
        files = [target] if target.is_file() else sorted(p for p in target.rglob("*") if p.is_file())
        for file in files:
            relative = Path(os.path.normpath(os.path.relpath(file, root))).as_posix()
            if not any(part.startswith(".") and part not in (".", "..") for part in Path(relative).parts) \
                    and relative not in exclude:
                found[relative] = file
    return dict(sorted(found.items()))


_TEMPORARY_FILE = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$")  # atomic_path's mkstemp names
_STAGING_FOLDER = re.compile(r"^\..+\.([a-z0-9_]{8}|staging)$")  # atomic_directory's mkdtemp, save_sharded's


def clean_leftovers(root: str | Path) -> list[str]:
    """Remove what killed writes left under `root`: temporary files and staging folders of `atomic_path`,
    `atomic_directory` and sharded checkpoints. A folder renamed aside by `publish_directory` (`.<name>.previous`)
    is put back when the kill came before its replacement took its place, else removed. Only for a caller that
    knows no other writer is at work (`hooks.RunLockHook`, under the run lock). Returns what it did, one line
    per entry."""
    done = []
    for folder, folders, files in os.walk(root):
        folder = Path(folder)
        for name in files:
            if _TEMPORARY_FILE.match(name):
                (folder / name).unlink(missing_ok=True)
                done.append(f"removed {folder / name}")
        for name in list(folders):
            path = folder / name
            if name.startswith(".") and name.endswith(".previous"):
                original = folder / name[1:-len(".previous")]
                if original.exists():
                    shutil.rmtree(path, ignore_errors=True)
                    done.append(f"removed {path}")
                else:
                    path.rename(original)
                    done.append(f"restored {original} (its replacement was never put in place)")
                folders.remove(name)
            elif _STAGING_FOLDER.match(name):
                shutil.rmtree(path, ignore_errors=True)
                done.append(f"removed {path}")
                folders.remove(name)
    return done
