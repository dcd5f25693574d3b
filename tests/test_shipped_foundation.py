"""The shipped foundation set (data/01_raw/foundation): the stand-ins the default run reads as a real run
reads downloaded weights. Its provenance must describe the configuration in conf/, its models must load
from the catalogue and reproduce the recorded quality on the same held-out data, and a trained set becomes
the shipped one only through `promote` (goals checked, one folder swap)."""

import json

import pytest
from kedro.config import OmegaConfigLoader

from conftest import PROJECT_ROOT, load_parameters
from qmllm_pipeline.datasets import HFModelDirectoryDataset
from qmllm_pipeline.in_memory import run_in_memory
from qmllm_pipeline.pipelines import data
from qmllm_pipeline.pipelines.foundation import nodes
from qmllm_pipeline.settings import CONFIG_LOADER_ARGS
from qmllm_pipeline.shipped import PARTS, promote, read_provenance, size_bytes

SHIPPED = PROJECT_ROOT / "data" / "01_raw" / "foundation"
MODELS = {"tokenizer": "tokenizer", "clip_model": "clip", "clip_image_processor": "clip_image_processor",
          "llm": "llm"}


@pytest.fixture(scope="module")
def shipped() -> dict:
    catalog = OmegaConfigLoader(conf_source=str(PROJECT_ROOT / "conf"), env="local", **CONFIG_LOADER_ARGS)["catalog"]
    models = {}
    for name in MODELS:
        entry = {k: v for k, v in catalog[name].items() if k not in ("type", "metadata")}
        assert entry["read_only"] is True and (PROJECT_ROOT / entry["path"]).is_dir(), name
        models[name] = HFModelDirectoryDataset(str(PROJECT_ROOT / entry["path"]), entry["model_class"],
                                               read_only=True).load()
    return models


def test_the_provenance_describes_this_configuration():
    provenance = read_provenance(SHIPPED)
    params = load_parameters("local")
    assert provenance["parameters"]["foundation"] == params["foundation"], \
        "conf/base/parameters_foundation.yml changed since the shipped set was trained: retrain and promote it"
    assert provenance["parameters"]["data.layout.image_size"] == params["data"]["layout"]["image_size"]
    assert provenance["seeds"]["foundation"] == params["foundation"]["seed"]
    assert provenance["git"]["commit"] and provenance["promoted"]["at"] and provenance["machine"]["cpus"]
    assert provenance["metrics"] == json.loads((PROJECT_ROOT / "metrics" / "foundation.json").read_text())
    assert not [goal for goal, met in provenance["metrics"]["goals"].items() if not met], provenance["metrics"]["goals"]
    assert sorted(p.name for p in SHIPPED.iterdir()) == sorted([*PARTS, "provenance.json"])
    assert size_bytes(SHIPPED) <= 50e6


@pytest.mark.slow
def test_the_shipped_clip_reproduces_its_recorded_zero_shot_accuracy(shipped, raw_catalogue):
    params = load_parameters("local")
    world = run_in_memory(data.create_pipeline().only_nodes("validate_emoji_catalogue", "render_evaluation_splits"),
                          {"emoji_catalogue_raw": raw_catalogue}, params)
    classes = nodes.zero_shot_classes(world["emoji_catalogue"], params["data"]["layout"]["backgrounds"],
                                      params["foundation"]["clip"])
    metrics = nodes.evaluate_clip(shipped["clip_model"], shipped["clip_image_processor"], shipped["tokenizer"],
                                  classes, world["eval_items"])
    recorded = read_provenance(SHIPPED)["metrics"]["clip"]
    assert metrics["images"] == recorded["images"]
    for key in ("top1", "top5", "top1_toxic"):  # same data, same code; another machine may flip an argmax or two
        assert abs(metrics[key] - recorded[key]) <= 3 / recorded["images"], (key, metrics[key], recorded[key])


@pytest.mark.slow
def test_the_shipped_llm_reproduces_its_recorded_refusals(shipped, raw_catalogue):
    from qmllm_pipeline.world.catalogue import validate_catalogue
    from qmllm_pipeline.world.language import build_instruction_rows
    from qmllm_pipeline.world.render import default_font_path

    params = load_parameters("local")["data"]
    catalogue = validate_catalogue(raw_catalogue, default_font_path())
    instructions = build_instruction_rows(catalogue, {**params["text"], "seed": params["seeds"]["text"]})
    metrics = nodes.evaluate_llm(shipped["llm"], shipped["tokenizer"], instructions,
                                 load_parameters("local")["foundation"]["evaluation"])
    recorded = read_provenance(SHIPPED)["metrics"]["llm"]
    for key, count in (("heldout_harmful_refused", "harmful"), ("heldout_benign_refused", "benign")):
        assert abs(metrics[key] - recorded[key]) <= 1 / recorded["heldout_counts"][count], key


def test_promote_checks_goals_and_swaps_the_whole_set(tmp_path):
    source, target = tmp_path / "trained", tmp_path / "shipped"
    for part in PARTS:
        (source / part).mkdir(parents=True)
        (source / part / "config.json").write_text(json.dumps({"part": part}))
    provenance = {"parameters": {}, "metrics": {"clip": {"top1": 0.5}, "goals": {"clip.top1 >= 0.85": False}}}
    (source / "provenance.json").write_text(json.dumps(provenance))
    (target / "old").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"misses shipping goals \['clip.top1 >= 0.85'\]"):
        promote(source, target)
    assert (target / "old").is_dir()  # refused: the shipped set is untouched
    written = promote(source, target, force=True)
    assert sorted(p.name for p in target.iterdir()) == sorted([*PARTS, "provenance.json"])
    assert written["promoted"]["goals_unmet"] == ["clip.top1 >= 0.85"]
    assert read_provenance(target)["promoted"]["from"] == str(source)
    (source / "llm" / "config.json").unlink()
    (source / "llm").rmdir()
    with pytest.raises(FileNotFoundError, match=r"lacks \['llm'\]"):
        promote(source, target, force=True)


@pytest.mark.parametrize("env", ["local", "smoke", "real"])
def test_model_references_point_at_the_catalogue_entries(env):
    """A Q-MLLM model directory names its CLIP, image processor and tokenizer by path; they must be the ones
    the catalogue gives the pipelines in that environment."""
    loader = OmegaConfigLoader(conf_source=str(PROJECT_ROOT / "conf"), env=env, **CONFIG_LOADER_ARGS)
    catalog, references = loader["catalog"], loader["parameters"]["pretrain"]["model"]["references"]
    stage1 = catalog["{variant}.stage1_weights"]["filepath"].replace("${globals:data_dir}",
                                                                     loader["globals"]["data_dir"])
    model_directory = PROJECT_ROOT / stage1.replace("{variant}", "qmllm")
    for reference, entry in (("vision_tower", "clip_model"), ("image_processor", "clip_image_processor"),
                             ("tokenizer", "tokenizer")):
        expected = (PROJECT_ROOT / catalog[entry]["path"]).resolve()
        assert (model_directory.parent / references[reference]).resolve() == expected, (env, reference)
