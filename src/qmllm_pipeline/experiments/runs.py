"""Run (part of) a Kedro pipeline in memory: the inputs and parameters given, every output kept and returned.
What the tests and the sweeps use to run the pipelines' own nodes under other parameters."""

from __future__ import annotations

import copy
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from kedro.io import DataCatalog, MemoryDataset
from kedro.pipeline import Pipeline
from kedro.runner import SequentialRunner


class KeptMemoryDataset(MemoryDataset):
    """A MemoryDataset the runner cannot release, so intermediate outputs can be read after the run."""

    def _release(self) -> None:
        pass


def lookup(params: dict, dotted: str):
    """`params["a"]["b"]` for "a.b"."""
    for key in dotted.split("."):
        params = params[key]
    return params


def with_overrides(params: dict, **overrides) -> dict:
    """A deep copy of `params` with dotted keys set (`with_overrides(p, **{"pretrain.model.cls_codes": 64})`)."""
    changed = copy.deepcopy(params)
    for dotted, value in overrides.items():
        *path, last = dotted.split(".")
        (lookup(changed, ".".join(path)) if path else changed)[last] = value
    return changed


def run_in_memory(pipeline: Pipeline, inputs: dict, params: dict | None = None) -> dict:
    """Run `pipeline` on in-memory `inputs` (dataset name -> value); every `params:...` input not given is
    looked up in `params`. Returns every output, intermediate ones too, by name."""
    catalog = DataCatalog()
    for name, value in inputs.items():
        catalog[name] = value
    for name in pipeline.inputs():
        if name.startswith("params:") and name not in inputs:
            catalog[name] = lookup(params, name.removeprefix("params:"))
    for name in pipeline.all_outputs():
        catalog[name] = KeptMemoryDataset(copy_mode="assign")
    SequentialRunner().run(pipeline, catalog)
    return {name: catalog.load(name) for name in pipeline.all_outputs()}


@contextmanager
def project_context(project: Path, env: str = "base") -> Iterator:
    """The Kedro context of the project at `project` in environment `env` ("base": no overlay), for the
    notebooks' experiment scripts: its `catalog` loads the trained run's datasets, `params` its parameters.
    Kedro is imported here, so a script's `--help` stays quick."""
    from kedro.framework.session import KedroSession
    from kedro.framework.startup import bootstrap_project

    bootstrap_project(project)
    with KedroSession.create(project_path=project, env=None if env == "base" else env) as session:
        yield session.load_context()


def write_table(table, out: Path) -> None:
    """Write a sweep's table (a DataFrame) to the CSV `out` through a temporary file, so an interrupted
    write never leaves a half file over an earlier result, then print it."""
    out.parent.mkdir(parents=True, exist_ok=True)
    scratch = out.with_suffix(".tmp")
    table.to_csv(scratch, index=False)
    os.replace(scratch, out)
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print(f"written to {out}")
