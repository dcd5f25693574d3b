"""dvc.yaml against the Kedro project: one stage per pipeline, outputs that are catalogue paths, and the
dependency graph that decides what `dvc repro` re-runs (no data needed: DVC's own graph, read from dvc.yaml)."""

import yaml
from dvc.repo import Repo

from conftest import PROJECT_ROOT
from qmllm_pipeline.pipeline_registry import register_pipelines

DVC_YAML = yaml.safe_load((PROJECT_ROOT / "dvc.yaml").read_text())
CATALOG = (PROJECT_ROOT / "conf" / "base" / "catalog.yml").read_text()


def _downstream(stage: str) -> set[str]:
    """Stages that (transitively) read an output of `stage`."""
    stages = DVC_YAML["stages"]
    outs = {name: {next(iter(o)) if isinstance(o, dict) else o for o in spec.get("outs", [])}
            for name, spec in stages.items()}
    found, frontier = set(), {stage}
    while frontier:
        current = frontier.pop()
        for name, spec in stages.items():
            reads = [dep for dep in spec.get("deps", []) for out in outs[current]
                     if dep == out or dep.startswith(f"{out}/")]
            if name not in found and reads:
                found.add(name)
                frontier.add(name)
    return found


def test_one_stage_per_pipeline_running_kedro():
    pipelines = set(register_pipelines()) - {"__default__", "ingest", "real"}  # real: conf/real's chain, no DVC stage
    assert set(DVC_YAML["stages"]) == pipelines
    for name, spec in DVC_YAML["stages"].items():
        assert spec["cmd"].startswith(f"kedro run --pipelines {name}")
        assert any(dep.startswith(f"src/qmllm_pipeline/pipelines/{name}") for dep in spec["deps"]), name


def test_outputs_are_catalogue_paths_and_metrics_live_in_git():
    for spec in DVC_YAML["stages"].values():
        for out in spec.get("outs", []):
            out = next(iter(out)) if isinstance(out, dict) else out
            if out == "data/01_raw/foundation":  # the shipped stand-ins: git-tracked, read-only in the catalogue
                assert "path: data/01_raw/foundation/clip," in CATALOG
                continue
            # data/<layer>/...: the catalogue writes ${globals:data_dir}/<layer>/... for the world and its features,
            # ${globals:output_dir}/<layer>/... for what a profile trains and reports (data/ in base)
            relative = out.split("/", 1)[1]
            assert (f"${{globals:data_dir}}/{relative}" in CATALOG or f"${{globals:output_dir}}/{relative}" in CATALOG
                    or relative.split("/")[0] == "06_models"), out
        for metric in spec.get("metrics", []):
            path, options = next(iter(metric.items()))
            assert path.startswith("metrics/") and options == {"cache": False}
    assert "versioned: true" not in CATALOG  # DVC versions the files: never two systems for one artifact


def test_a_patch_codebook_change_reruns_pretrain_and_what_follows_only():
    params = {name: [p for entry in spec.get("params", []) for p in entry] for name, spec in DVC_YAML["stages"].items()}
    touched = {name for name, files in params.items() if "conf/base/parameters_pretrain.yml" in files}
    assert touched == {"pretrain"}  # later stages read the model's config.json, an output of pretrain
    assert _downstream("pretrain") == {"finetune", "safety_map", "evaluate"}
    assert not {"data", "foundation", "features"} & (touched | _downstream("pretrain"))


def test_the_shipped_foundation_set_feeds_the_chain():
    assert _downstream("foundation") == {"features", "pretrain", "finetune", "safety_map", "evaluate"}
    assert "foundation" in _downstream("data")  # retrained only when the world or its own code and parameters change


def test_dvc_reads_the_pipeline_graph():
    with Repo(str(PROJECT_ROOT)) as repo:
        assert {stage.name for stage in repo.index.stages} == set(DVC_YAML["stages"])
        assert repo.config["core"]["analytics"] is False  # .dvc/config: no usage reports
