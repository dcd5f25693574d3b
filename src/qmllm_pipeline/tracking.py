"""Per-step training metrics: kept in memory for the loss-curve plots and sent to the active MLflow run
in batches (one SQLite write per `every` steps instead of one per metric). Without an active run (plain
Python use, unit tests) it only keeps the history."""

from __future__ import annotations

import time
from collections import defaultdict

import mlflow
from mlflow.entities import Metric


class StepLogger:
    def __init__(self, prefix: str, every: int = 25):
        self.prefix = prefix
        self.every = max(1, every)
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

    def flush(self) -> None:
        run = mlflow.active_run()
        if run is not None and self._pending:
            mlflow.MlflowClient().log_batch(run.info.run_id, metrics=self._pending[:1000])
            self._pending = self._pending[1000:]
            if self._pending:
                self.flush()
        elif run is None:
            self._pending.clear()


def log_summary_metrics(metrics: dict, prefix: str = "") -> None:
    """Log a nested dict of numbers to the active MLflow run as flat `a/b/c` metrics (no-op without a run)."""
    run = mlflow.active_run()
    if run is None:
        return
    flat = {}

    def walk(node, path):
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, f"{path}/{key}" if path else str(key))
        elif isinstance(node, (int, float)) and not isinstance(node, bool):
            flat[path] = float(node)

    walk(metrics, prefix)
    now = int(time.time() * 1000)
    entries = [Metric(key, value, now, 0) for key, value in flat.items()]
    for start in range(0, len(entries), 1000):
        mlflow.MlflowClient().log_batch(run.info.run_id, metrics=entries[start:start + 1000])
