"""Run (part of) a Kedro pipeline in memory: the inputs and parameters given, every output kept and returned.
What the tests and the lab's sweeps use to run the pipelines' own nodes under other parameters."""

from __future__ import annotations

from kedro.io import DataCatalog, MemoryDataset
from kedro.pipeline import Pipeline
from kedro.runner import SequentialRunner

from qmllm_pipeline.dotted import lookup
from qmllm_pipeline.models.feature_shards import gather


class KeptMemoryDataset(MemoryDataset):
    """A MemoryDataset the runner cannot release, so intermediate outputs can be read after the run. Lazy
    feature shards are computed and concatenated as they are saved, as the default catalogue's
    `SafetensorsDataset` does (once, whatever reads them next)."""

    def save(self, data) -> None:
        super().save(gather(data))

    def _release(self) -> None:
        pass


def run_in_memory(pipeline: Pipeline, inputs: dict, params: dict | None = None) -> dict:
    """Run `pipeline` on in-memory `inputs` (dataset name -> value); every `params:...` input not given is
    looked up in `params`. Returns every output, intermediate ones too, by name."""
    catalog = DataCatalog()
    for name, value in inputs.items():
        catalog[name] = value
    for name in pipeline.inputs():
        if name.startswith("params:") and name not in inputs:
            *path, last = name.removeprefix("params:").split(".")
            parent = lookup(params, ".".join(path))
            if not isinstance(parent, dict) or last not in parent:
                raise KeyError(f"{name}: not in the parameters given")
            catalog[name] = parent[last]
    for name in pipeline.all_outputs():
        catalog[name] = KeptMemoryDataset(copy_mode="assign")
    SequentialRunner().run(pipeline, catalog)
    return {name: catalog.load(name) for name in pipeline.all_outputs()}
