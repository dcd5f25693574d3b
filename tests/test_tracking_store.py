"""Every run in the project's one MLflow store (issue 48): `dvc exp run --temp` runs a stage in a copy of the
project under `.dvc/tmp/exps/` and deletes it after, so a store relative to the working directory would lose
the run; the hooks resolve the store from `DVC_ROOT` and tag each run with its seed, commit, experiment and
lever."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow

from conftest import KEDRO, copy_project

DVC = [sys.executable, "-m", "dvc"]


def test_dvc_runs_a_temp_experiment_in_a_copy_and_names_the_project_it_came_from(tmp_path):
    """What the hooks rely on, asked of DVC itself: the stage's working directory is a temporary copy under
    `.dvc/tmp/exps/`, and `DVC_ROOT`, `DVC_EXP_NAME` and `DVC_EXP_BASELINE_REV` name the project, the
    experiment and its commit; the caller's environment reaches the stage."""
    git = ["git", "-c", "user.email=t@t", "-c", "user.name=t"]
    subprocess.run([*git, "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run([*DVC, "init", "-q"], cwd=tmp_path, check=True)
    (tmp_path / "probe.py").write_text(
        "import json, os\njson.dump({k: os.environ.get(k) for k in ('DVC_ROOT', 'DVC_EXP_NAME', "
        "'DVC_EXP_BASELINE_REV', 'QMLLM_LEVER_PROBE')} | {'cwd': os.getcwd()}, open('out.json', 'w'))\n")
    (tmp_path / "dvc.yaml").write_text("stages:\n  probe:\n    cmd: python3 probe.py\n    deps: [probe.py]\n"
                                       "    params: [x]\n    outs:\n      - out.json:\n          cache: false\n")
    (tmp_path / "params.yaml").write_text("x: 1\n")
    subprocess.run([*git, "add", "-A"], cwd=tmp_path, check=True)
    subprocess.run([*git, "commit", "-qm", "probe"], cwd=tmp_path, check=True)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tmp_path, capture_output=True, text=True).stdout.strip()
    env = dict(os.environ, QMLLM_LEVER_PROBE="inherited")
    run = subprocess.run([*DVC, "exp", "run", "--temp", "-n", "seed-2-probe", "-S", "x=2"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    subprocess.run([*DVC, "exp", "apply", "seed-2-probe"], cwd=tmp_path, check=True, capture_output=True)
    seen = json.loads((tmp_path / "out.json").read_text())
    assert seen["DVC_ROOT"] == str(tmp_path) and seen["DVC_EXP_NAME"] == "seed-2-probe"
    assert seen["DVC_EXP_BASELINE_REV"] == head and seen["QMLLM_LEVER_PROBE"] == "inherited"
    assert Path(seen["cwd"]).is_relative_to(tmp_path / ".dvc" / "tmp" / "exps") and not Path(seen["cwd"]).exists()


def test_a_run_in_a_temporary_copy_lands_in_the_projects_store_tagged(tmp_path):
    """A `kedro run` in a copy under `.dvc/tmp/exps/`, with the environment DVC gives it: the run is in the
    project's `mlflow.db`, its artifacts in the project's `mlruns/`, tagged with seed, commit, experiment
    and lever, named after the experiment, with system metrics; `qmllm runs` shows them."""
    project = copy_project(tmp_path)
    copy = project / ".dvc" / "tmp" / "exps" / "standalone" / "tmpabc123"
    copy.mkdir(parents=True)
    copy_project(copy)
    env = dict(os.environ, KEDRO_DISABLE_TELEMETRY="true", DO_NOT_TRACK="1", DVC_ROOT=str(project),
               DVC_EXP_NAME="seed-3-margin-abc1234", DVC_EXP_BASELINE_REV="0123456789abcdef" * 2 + "01234567",
               MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL="1")
    env.pop("MLFLOW_TRACKING_URI", None)
    run = subprocess.run([*KEDRO, "run", "--env", "smoke", "--pipelines", "data", "--params", "seed=3"], cwd=copy,
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert (project / "mlflow.db").is_file() and not (copy / "mlflow.db").exists()
    shutil.rmtree(copy)  # as DVC does after the experiment

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("qmllm_pipeline")
    assert experiment.artifact_location == (project / "mlruns").as_uri()
    (found,) = client.search_runs([experiment.experiment_id])
    tags = found.data.tags
    assert tags["seed"] == "3" and tags["lever"] == "margin" and tags["dvc_experiment"] == "seed-3-margin-abc1234"
    assert tags["git_commit"].startswith("0123456789abcdef") and tags["mlflow.runName"] == "seed-3-margin-abc1234"
    assert any(name.startswith("system/") for name in found.data.metrics), sorted(found.data.metrics)[:5]

    table = subprocess.run([sys.executable, "-m", "qmllm_pipeline.commands", "runs", "--project", str(project)],
                           capture_output=True, text=True, timeout=120)
    assert table.returncode == 0, table.stderr
    rows = {line.split()[0]: line.split()[1:] for line in table.stdout.splitlines() if line.strip()}
    assert rows["seed"] == ["3"] and rows["lever"] == ["margin"] and rows["name"] == ["seed-3-margin-abc1234"]
    runs = [sys.executable, "-m", "qmllm_pipeline.commands", "runs", "--project", str(project), "--lever"]
    assert "seed-3-margin-abc1234" in subprocess.run([*runs, "margin"], capture_output=True, text=True).stdout
    other = subprocess.run([*runs, "default"], capture_output=True, text=True)
    assert other.returncode == 1 and "no runs in the experiment 'qmllm_pipeline' with lever 'default'" in other.stderr
