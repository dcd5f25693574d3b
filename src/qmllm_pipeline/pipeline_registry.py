"""Project pipelines. `__default__` is the embedded-world chain data -> features -> pretrain -> finetune ->
safety_map -> evaluate, reading the shipped foundation stand-ins (as a real run reads downloaded CLIP and
Vicuna weights); `foundation` trains a new set of them. `ingest` is the real-data alternative to `data`
(both write the same catalogue entries, so they are never run together); `real` is the chain from it."""

from kedro.pipeline import Pipeline

from qmllm_pipeline.parameters import load_parameters
from qmllm_pipeline.pipelines import data, evaluate, features, finetune, foundation, ingest, pretrain, safety_map


def register_pipelines() -> dict[str, Pipeline]:
    params = load_parameters()   # the variants and budgets the namespaced pipelines are built for
    pipelines = {
        "data": data.create_pipeline(),
        "foundation": foundation.create_pipeline(),
        "features": features.create_pipeline(),
        "pretrain": pretrain.create_pipeline(params),
        "finetune": finetune.create_pipeline(params),
        "safety_map": safety_map.create_pipeline(),
        "evaluate": evaluate.create_pipeline(params),
        "ingest": ingest.create_pipeline(),
    }
    chain = ("data", "features", "pretrain", "finetune", "safety_map", "evaluate")
    pipelines["__default__"] = sum((pipelines[name] for name in chain), Pipeline([]))
    # the real configuration's chain, from real data: `kedro run --env real --pipelines real`
    pipelines["real"] = sum((pipelines[name] for name in ("ingest", *chain[1:])), Pipeline([]))
    return pipelines
