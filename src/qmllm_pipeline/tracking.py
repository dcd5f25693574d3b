"""Per-step training metrics: kept in memory for the loss-curve plots and sent to the active MLflow run
in batches (one SQLite write per `every` steps instead of one per metric). Without an active run (plain
Python use, unit tests) it only keeps the history."""

from __future__ import annotations

import time
from collections import defaultdict

import mlflow
from mlflow.entities import Metric


class StepLogger:
    """`send`: False keeps the history only (a training worker process, whose history rank 0 hands back to
    the process that owns the MLflow run, which `replay`s it)."""

    def __init__(self, prefix: str, every: int = 25, send: bool = True):
        self.prefix = prefix
        self.every = max(1, every)
        self.send = send
        self.history: dict[str, list[tuple[int, float]]] = defaultdict(list)
        self._pending: list[Metric] = []

    def log(self, step: int, **values: float) -> None:
        now = int(time.time() * 1000)
        for name, value in values.items():
            value = float(value)
            self.history[name].append((step, value))
            self._pending.append(Metric(f"{self.prefix}/{name}", value, now, step))
        if step % self.every == 0:
            self.flush()

    def replay(self, history: dict[str, list]) -> None:
        """Log a history recorded elsewhere (`{name: [(step, value), ...]}`), as if it had been logged here."""
        now = int(time.time() * 1000)
        for name, points in history.items():
            for step, value in points:
                self.history[name].append((int(step), float(value)))
                self._pending.append(Metric(f"{self.prefix}/{name}", float(value), now, int(step)))
        self.flush()

    def flush(self) -> None:
        run = mlflow.active_run() if self.send else None
        if run is not None and self._pending:
            mlflow.MlflowClient().log_batch(run.info.run_id, metrics=self._pending[:1000])
            self._pending = self._pending[1000:]
            if self._pending:
                self.flush()
        elif run is None:
            self._pending.clear()


def log_summary_metrics(metrics: dict, prefix: str = "") -> None:
    """Log a nested dict of numbers to the active MLflow run as flat `a/b/c` metrics (no-op without a run).
    The `intervals` blocks (counts and 95% intervals of the rates) stay in the metrics files only."""
    run = mlflow.active_run()
    if run is None:
        return
    flat = {}

    def walk(node, path):
        if isinstance(node, dict):
            for key, value in node.items():
                if key != "intervals":
                    walk(value, f"{path}/{key}" if path else str(key))
        elif isinstance(node, (int, float)) and not isinstance(node, bool):
            flat[path] = float(node)

    walk(metrics, prefix)
    now = int(time.time() * 1000)
    entries = [Metric(key, value, now, 0) for key, value in flat.items()]
    for start in range(0, len(entries), 1000):
        mlflow.MlflowClient().log_batch(run.info.run_id, metrics=entries[start:start + 1000])


DEFAULT_COMPARISON_METRICS = (
    "foundation/clip/top1", "pretrain/qmllm/codebooks/cls/codes_used", "pretrain/qmllm/codebooks/patch/codes_used",
    "safety_map/qmllm/dsr/single", "safety_map/qmllm/fpr_neutral",
    "evaluate/summary/qmllm/toxic_dsr_single", "evaluate/summary/qmllm/jailbreak_dsr_unconstrained",
    "evaluate/summary/baseline/jailbreak_dsr_eps64", "evaluate/summary/qmllm/caption_f1",
    "profile/total_seconds", "profile/peak_rss_mb",
)


RUN_TAGS = ("mlflow.runName", "pipeline", "env", "seed", "lever", "dvc_experiment", "git_commit")  # hooks.py sets them


def compare_runs(tracking_uri: str, last: int = 5, metrics: tuple[str, ...] = DEFAULT_COMPARISON_METRICS,
                 experiment: str = "qmllm_pipeline", all_params: bool = False, lever: str | None = None):
    """The latest `last` runs side by side (one column per run): tags, the parameters that differ between
    runs that have them (runs of single pipelines log only their own; all with `all_params`) and the chosen
    metrics; only those tagged with `lever` when given. Empty when the store has no such runs."""
    import pandas as pd

    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return pd.DataFrame()
    runs = client.search_runs([found.experiment_id], filter_string=f"tags.lever = '{lever}'" if lever else "",
                              order_by=["attributes.start_time DESC"], max_results=last)
    if not runs:
        return pd.DataFrame()
    params = pd.DataFrame([r.data.params for r in runs])
    if not all_params and len(runs) > 1:  # a parameter differs when two runs that have it disagree
        params = params.loc[:, [params[c].dropna().astype(str).nunique() > 1 for c in params.columns]]
    rows = {"started": [time.strftime("%Y-%m-%d %H:%M", time.localtime(r.info.start_time / 1000)) for r in runs],
            "status": [r.info.status for r in runs],
            **{tag: [r.data.tags.get(tag, "") for r in runs] for tag in RUN_TAGS}}
    rows["git_commit"] = [commit[:12] for commit in rows["git_commit"]]
    rows["name"] = rows.pop("mlflow.runName")
    rows.update({f"param {name}": params[name].tolist() for name in sorted(params.columns)})
    rows.update({name: [r.data.metrics.get(name) for r in runs] for name in metrics})
    return pd.DataFrame(rows, index=[r.info.run_id[:8] for r in runs]).T
