"""One run at a time per project: two `kedro run`s (or a `dvc repro` beside a `kedro run`) in one project
would share `data/`, the training checkpoints and `mlflow.db`, each overwriting what the other reads.

`RunLock` holds an exclusive `flock` on `<project>/.qmllm-run.lock` for the whole run and writes its holder
(pid, host, command, start time) into the file. A second run finds the lock taken and stops at once, naming
the holder. The kernel releases a `flock` when its holder dies, however it dies, so a lock left by a killed
run is never in the way: the next run takes it over and says whose it was. (`flock` is local to one
machine; on a network filesystem shared by several machines, run one project copy per machine.)

Plain Python (no Kedro): `hooks.RunLockHook` takes it before a run writes anything and lets go after.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import sys
import time
from pathlib import Path

logger = logging.getLogger(__name__)
LOCK_FILE = ".qmllm-run.lock"


class RunLockedError(RuntimeError):
    """Another run holds the project's lock."""


class RunLock:
    def __init__(self, project: str | Path):
        self.path = Path(project) / LOCK_FILE
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self, command: str | None = None) -> dict | None:
        """Take the lock or raise `RunLockedError` naming its holder. Returns what a previous holder that is
        gone left in the file (a killed run), or None."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read(fd)
            os.close(fd)
            raise RunLockedError(f"{self.path}: another run is using this project ({describe(holder)}); wait for "
                                 "it to finish or stop it, or run in a copy of the project (dvc exp run --temp)"
                                 ) from None
        left = _read(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
                                  "command": command or " ".join(sys.argv)}).encode() + b"\n", 0)
        self._fd = fd
        if left:
            logger.warning("took over the run lock of a run that is gone (%s)", describe(left))
        return left or None

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            os.ftruncate(self._fd, 0)  # an empty file: nobody to name, nothing stale
        os.close(self._fd)  # closing the descriptor drops the flock
        self._fd = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _read(fd: int) -> dict:
    try:
        text = os.pread(fd, 4096, 0).decode(errors="replace").strip()
        return json.loads(text) if text else {}
    except (OSError, ValueError):
        return {"unreadable": True}


def describe(holder: dict) -> str:
    if not holder or holder.get("unreadable"):
        return "holder unknown"
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started", 0)))
    return f"pid {holder.get('pid')} on {holder.get('host')}, `{holder.get('command')}`, since {started}"
