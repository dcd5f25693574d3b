"""Runs that cannot collide (docs/faults.md): one run per project at a time, a killed run's lock taken over,
and what killed writes left cleaned before the next run writes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import KEDRO, copy_project
from qmllm_pipeline.files import atomic_directory, clean_leftovers
from qmllm_pipeline.run_lock import LOCK_FILE, RunLock, RunLockedError

ENV = dict(os.environ, KEDRO_DISABLE_TELEMETRY="true", DO_NOT_TRACK="1", COLUMNS="200")
HOLD = ("import sys, time; from qmllm_pipeline.run_lock import RunLock; RunLock(sys.argv[1]).acquire('holder'); "
        "print('held', flush=True); time.sleep(600)")


def _holder(project: Path) -> subprocess.Popen:
    """Another process holding the project's lock until it is killed."""
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(project)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_a_second_holder_is_refused_with_the_first_named_and_a_dead_holder_is_taken_over(tmp_path):
    holder = _holder(tmp_path)
    try:
        with pytest.raises(RunLockedError, match=rf"pid {holder.pid} on .*`holder`"):
            RunLock(tmp_path).acquire("second")
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    lock = RunLock(tmp_path)
    left = lock.acquire("third")  # the kernel dropped the dead holder's flock; its note is still in the file
    assert left["pid"] == holder.pid and lock.held
    lock.release()
    assert (tmp_path / LOCK_FILE).read_text() == ""  # let go cleanly: nothing stale to report next time
    with RunLock(tmp_path) as again:
        assert again.held


def test_clean_leftovers_removes_temporaries_and_puts_back_a_folder_whose_swap_was_killed(tmp_path):
    table = tmp_path / "03_primary" / "dialogs.parquet"
    table.parent.mkdir()
    table.write_bytes(b"kept")
    (table.parent / ".dialogs.parquet.k2j4h5g6.tmp").write_bytes(b"half")     # atomic_path, killed
    staging = tmp_path / "06_models" / ".llm.ab12cd34"                         # atomic_directory, killed
    staging.mkdir(parents=True)
    (staging / "model.safetensors").write_bytes(b"half")
    (tmp_path / "06_models" / ".shards.staging").mkdir()                       # a sharded checkpoint, killed
    swapped = tmp_path / "06_models" / ".stage1_weights.previous"              # killed between the two renames
    swapped.mkdir()
    (swapped / "w.safetensors").write_bytes(b"old")
    published = tmp_path / "06_models" / "tokenizer"                           # killed before the last rmtree
    published.mkdir()
    (tmp_path / "06_models" / ".tokenizer.previous").mkdir()
    (tmp_path / ".gitkeep").write_text("")

    done = clean_leftovers(tmp_path)

    assert len(done) == 5, done
    assert any("restored" in line and "stage1_weights" in line for line in done)
    left = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    assert left == [".gitkeep", "03_primary", "03_primary/dialogs.parquet", "06_models", "06_models/stage1_weights",
                    "06_models/stage1_weights/w.safetensors", "06_models/tokenizer"]
    assert table.read_bytes() == b"kept"
    with atomic_directory(tmp_path / "fresh") as folder:  # what the writers leave when they finish: nothing
        (folder / "x").write_text("x")
    assert clean_leftovers(tmp_path) == []


@pytest.mark.slow
def test_a_second_kedro_run_stops_at_once_and_a_killed_runs_lock_and_leftovers_do_not_stay(tmp_path):
    project = copy_project(tmp_path)
    holder = _holder(project)
    try:
        busy = subprocess.run([*KEDRO, "run", "--env", "smoke", "--pipelines", "data"], cwd=project, env=ENV,
                              capture_output=True, text=True, timeout=300)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert busy.returncode == 1, busy.stderr[-2000:]
    assert f"Error: {project / LOCK_FILE}: another run is using this project (pid {holder.pid}" in busy.stderr
    assert "Traceback" not in busy.stderr
    assert not (project / "data" / "smoke").exists()  # it wrote nothing
    assert "Running node" not in busy.stdout + busy.stderr  # stopped before the first node

    leftover = project / "data" / "smoke" / "03_primary" / ".dialogs.parquet.ab12cd34.tmp"
    leftover.parent.mkdir(parents=True)
    leftover.write_bytes(b"half a table")
    run = subprocess.run([*KEDRO, "run", "--env", "smoke", "--pipelines", "data"], cwd=project, env=ENV,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    log = " ".join(run.stdout.split() + run.stderr.split())
    assert f"took over the run lock of a run that is gone (pid {holder.pid}" in log
    assert "leftover of an interrupted write: removed" in log and not leftover.exists()
    assert (project / "data" / "smoke" / "03_primary" / "dialogs.parquet").is_file()
    assert (project / LOCK_FILE).read_text() == ""  # released at the end
