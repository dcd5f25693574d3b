"""What a `kedro run` trained, loaded back for tools outside the pipelines (`qmllm bench`, the notebooks)."""

from __future__ import annotations

from kedro.runner import SequentialRunner

from qmllm_pipeline.models.guarded import GuardedMLLM


def evaluation_systems_from_catalog(catalog) -> dict[str, GuardedMLLM]:
    """The three evaluated systems (`baseline`, `safeclip`, `qmllm`), assembled by the `evaluate` pipeline's
    own nodes from the saved models in `catalog` (a Kedro context's catalogue, parameters included)."""
    from qmllm_pipeline.pipelines import evaluate

    pipeline = evaluate.create_pipeline(catalog.load("parameters")).to_outputs("evaluation_systems")
    SequentialRunner().run(pipeline, catalog)
    return catalog.load("evaluation_systems")
