"""Project pipelines. `__default__` is the embedded-world chain; `ingest` is the real-data alternative
to `data` (both write the same catalogue entries, so they are never run together)."""

from kedro.pipeline import Pipeline

from qmllm_pipeline.pipelines import data, foundation, ingest


def register_pipelines() -> dict[str, Pipeline]:
    pipelines = {
        "data": data.create_pipeline(),
        "foundation": foundation.create_pipeline(),
        "ingest": ingest.create_pipeline(),
    }
    pipelines["__default__"] = pipelines["data"] + pipelines["foundation"]
    return pipelines
