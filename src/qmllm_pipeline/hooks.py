"""Project hooks: one run at a time per project (a lock, then the leftovers of killed writes cleaned), every
run in the project's one MLflow store, torch's thread count for the whole run (`threads` in
conf/base/parameters.yml), tags on every MLflow run so runs compare cleanly in the UI (`pipeline`, `env`,
`variants`, `systems`, `device`, `seed`, `git_commit`, `dvc_experiment`, `lever`, a run name), and a profile
(seconds per pipeline stage and the process's peak resident memory, as MLflow metrics)."""

from __future__ import annotations

import logging
import os
import resource
import subprocess
import time
from collections import defaultdict
from pathlib import Path

import click
import mlflow
from kedro.framework.hooks import hook_impl

from qmllm_pipeline.constants import STAGES, SYSTEMS
from qmllm_pipeline.files import clean_leftovers
from qmllm_pipeline.run_lock import RunLock, RunLockedError

logger = logging.getLogger(__name__)


class RunLockHook:
    """The project's run lock (`run_lock.RunLock`), taken before any other hook of the run starts (tryfirst:
    before kedro-mlflow opens its MLflow run) and let go after the last one ends (trylast), whether the run
    succeeded or failed. Under the lock, what killed writes left in `data/` and the checkpoint folder is cleaned
    (`files.clean_leftovers`), each removal logged."""

    def __init__(self):
        self._lock: RunLock | None = None
        self._folders: tuple[Path, ...] = ()

    @hook_impl
    def after_context_created(self, context) -> None:
        project = Path(context.project_path)
        self._lock = RunLock(project)
        checkpoints = project / str(context.params.get("checkpoint_dir") or "data")
        self._folders = (project / "data", checkpoints)

    @hook_impl(tryfirst=True)
    def before_pipeline_run(self, run_params: dict) -> None:
        if self._lock is None:
            return
        self._lock.release()  # held only if this process's previous run stopped before its pipeline ran
        try:
            self._lock.acquire(_command(run_params))
        except RunLockedError as error:
            raise ProjectBusyError(str(error)) from None
        for folder in dict.fromkeys(self._folders):
            if folder.is_dir():
                for line in clean_leftovers(folder):
                    logger.warning("leftover of an interrupted write: %s", line)

    @hook_impl(trylast=True)
    def after_pipeline_run(self) -> None:
        if self._lock is not None:
            self._lock.release()

    @hook_impl(trylast=True)
    def on_pipeline_error(self) -> None:
        if self._lock is not None:
            self._lock.release()


class ProjectBusyError(RunLockedError, click.ClickException):
    """`RunLockedError` as `kedro run` shows it: `Error: <the holder>`, exit code 1, not a traceback."""

    def __init__(self, message: str):
        click.ClickException.__init__(self, message)


def _command(run_params: dict) -> str:
    pipelines = run_params.get("pipeline_names") or [run_params.get("pipeline_name") or "__default__"]
    env = run_params.get("env")
    return f"kedro run --pipelines {','.join(pipelines)}" + (f" --env {env}" if env else "")


USER_TRACKING_URI = os.environ.get("MLFLOW_TRACKING_URI")  # set by the user before the process started


def tracking_root(project_path: str | Path) -> Path:
    """Where the project's MLflow store lives: the project root, also for `dvc exp run --temp` (which runs in
    a copy under `.dvc/tmp/exps/` and names the project it came from in `DVC_ROOT`)."""
    root = os.environ.get("DVC_ROOT")
    return Path(root).resolve() if root and (Path(root) / "conf").is_dir() else Path(project_path).resolve()


class MlflowStoreHook:
    """Every run in the project's one MLflow store: `sqlite:///<project root>/mlflow.db`, an absolute URI, so
    that `dvc repro`, `dvc exp run --temp` and `qmllm seeds run` land where `kedro run` does (kedro-mlflow
    would resolve `sqlite:///mlflow.db` against the working directory, a temporary copy that DVC deletes).
    The experiment's artifacts go to `<project root>/mlruns`. A `MLFLOW_TRACKING_URI` set before the run (a
    tracking server) wins. MLflow's system metrics (CPU, memory, GPU) are on with `system_metrics: true`.
    Runs before kedro-mlflow's own `after_context_created` (tryfirst), which reads the URI from the
    environment (`server.mlflow_tracking_uri: null` in conf/base/mlflow.yml)."""

    @hook_impl(tryfirst=True)
    def after_context_created(self, context) -> None:
        root = tracking_root(context.project_path)
        uri = USER_TRACKING_URI or f"sqlite:///{root / 'mlflow.db'}"
        os.environ["MLFLOW_TRACKING_URI"] = uri  # each session its own project's store (tests run several)
        if not USER_TRACKING_URI:
            name = _experiment_name(context)
            client = mlflow.MlflowClient(tracking_uri=uri)
            if client.get_experiment_by_name(name) is None:
                client.create_experiment(name, artifact_location=(root / "mlruns").as_uri())
        if context.params.get("system_metrics"):
            mlflow.enable_system_metrics_logging()
        else:
            mlflow.disable_system_metrics_logging()


def _experiment_name(context) -> str:
    """The experiment conf/base/mlflow.yml names (read as kedro-mlflow reads it, before it has)."""
    from kedro.config import MissingConfigException

    context.config_loader.config_patterns.setdefault("mlflow", ["mlflow*", "mlflow*/**", "**/mlflow*"])
    try:
        configured = context.config_loader["mlflow"]
    except MissingConfigException:
        configured = {}
    return (configured.get("tracking") or {}).get("experiment", {}).get("name") or "qmllm_pipeline"


def _git_commit(project: Path) -> str:
    """`HEAD` of the project's git repository, `-dirty` with uncommitted changes; "" outside one (or without
    git)."""
    git = ["git", "-C", str(project)]
    try:
        head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=30)
        if head.returncode != 0:
            return ""
        dirty = subprocess.run([*git, "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, timeout=60).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return head.stdout.strip() + ("-dirty" if dirty else "")


def run_identity(project_path: str | Path, seed, pipelines: str) -> dict[str, str]:
    """The tags that tell runs apart in the MLflow UI: the seed, the git commit (the experiment's baseline
    under DVC; `-dirty` when the working tree has uncommitted changes), the DVC experiment and its lever label
    (`qmllm seeds run --label`), and a run name built from them."""
    from qmllm_pipeline.seeds import label_of

    experiment = os.environ.get("DVC_EXP_NAME", "")
    commit = os.environ.get("DVC_EXP_BASELINE_REV", "")
    if not commit:
        commit = _git_commit(Path(project_path))
    lever = label_of(experiment) or "default"
    name = experiment or f"{pipelines} seed {seed}" + (f" {commit[:7]}" if commit else "")
    return {"seed": str(seed), "git_commit": commit or "unknown", "dvc_experiment": experiment, "lever": lever,
            "mlflow.runName": name}


class TorchThreadsHook:
    """One thread count for every node of a run: on 2 cores, more torch threads than cores makes each
    training step 5-20x slower, and a node that forgot to set it would silently run oversubscribed."""

    @hook_impl
    def after_context_created(self, context) -> None:
        import torch

        threads = context.params.get("threads")
        if threads:
            torch.set_num_threads(int(threads))


class MlflowRunTagsHook:
    """kedro-mlflow opens the run in its own `before_pipeline_run`; this one runs after it (trylast)."""

    def __init__(self):
        self._variants: tuple[str, ...] = ()
        self._device = "auto"
        self._seed = None
        self._project = Path(".")

    @hook_impl
    def after_context_created(self, context) -> None:
        self._variants = tuple(context.params.get("variants") or ())
        self._device = str(context.params.get("device", "auto"))
        self._seed = context.params.get("seed")
        self._project = Path(context.project_path)

    @hook_impl(trylast=True)
    def before_pipeline_run(self, run_params: dict, pipeline) -> None:
        if mlflow.active_run() is None:  # tracking disabled for this pipeline
            return
        pipelines = run_params.get("pipeline_names") or [run_params.get("pipeline_name") or "__default__"]
        namespaces = {node.namespace.split(".")[0] for node in pipeline.nodes if node.namespace}
        tags = {"pipeline": ",".join(pipelines), "env": run_params.get("env") or "local",
                "variants": ",".join(v for v in self._variants if v in namespaces)}  # trained or evaluated here
        if any(node.name == "assemble_systems" for node in pipeline.nodes):
            tags["systems"] = ",".join(SYSTEMS)
        tags["device"] = _device_tag(self._device)
        tags.update(run_identity(self._project, self._seed, tags["pipeline"]))
        logger.info("models run on %s (device: %s)", tags["device"], self._device)
        mlflow.set_tags(tags)


def _device_tag(setting: str) -> str:
    """What `device` resolves to here, named for the run's tags (`cuda:0 (NVIDIA H100 ...)`, `cpu`), without
    touching CUDA (a training node may still fork GPU workers)."""
    import torch

    if setting == "auto":
        setting = "cuda" if torch.cuda.is_available() else "cpu"
    return setting if not setting.startswith("cuda") else f"{setting} ({torch.cuda.device_count()} GPU(s))"


def peak_rss_mb() -> float:
    """This process's peak resident set size so far (Linux reports kilobytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class RunProfileHook:
    """Wall time per pipeline stage (summed over its nodes, each with the saving of its outputs: lazy outputs
    such as the features' shards are computed as they are saved) and peak RSS of the run: logged as
    `profile/<stage>/seconds` and `profile/peak_rss_mb` before kedro-mlflow closes the run (tryfirst)."""

    def __init__(self):
        self._started: dict[str, float] = {}
        self._seconds: dict[str, float] = defaultdict(float)
        self._stage_of: dict[str, str] = {}
        self._run_started = 0.0

    @hook_impl
    def before_pipeline_run(self, run_params: dict) -> None:
        from kedro.framework.project import pipelines  # the run's registry, built once
        self._stage_of = {node.name: stage for stage in STAGES for node in pipelines[stage].nodes}
        self._seconds.clear()
        self._run_started = time.perf_counter()

    @hook_impl
    def before_node_run(self, node) -> None:
        self._started[node.name] = time.perf_counter()

    @hook_impl
    def after_node_run(self, node) -> None:
        started = self._started.pop(node.name, None)
        if started is not None:
            self._seconds[self._stage_of.get(node.name, "other")] += time.perf_counter() - started

    @hook_impl
    def before_dataset_saved(self, dataset_name: str, node) -> None:
        self._started[f"save:{dataset_name}"] = time.perf_counter()

    @hook_impl
    def after_dataset_saved(self, dataset_name: str, node) -> None:
        started = self._started.pop(f"save:{dataset_name}", None)
        if started is not None:
            self._seconds[self._stage_of.get(node.name, "other")] += time.perf_counter() - started

    @hook_impl(tryfirst=True)
    def after_pipeline_run(self) -> None:
        profile = {f"profile/{stage}/seconds": round(seconds, 2) for stage, seconds in self._seconds.items()}
        profile["profile/total_seconds"] = round(time.perf_counter() - self._run_started, 2)
        profile["profile/peak_rss_mb"] = round(peak_rss_mb(), 1)
        logger.info("run profile: %s", {k.removeprefix("profile/"): v for k, v in profile.items()})
        if mlflow.active_run() is not None:
            mlflow.log_metrics(profile)
