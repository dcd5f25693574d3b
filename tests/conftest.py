"""Shared fixtures. Torch tests must not run in parallel processes (2 cores: oversubscription)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest
from kedro.config import OmegaConfigLoader
from kedro.io import DataCatalog, MemoryDataset
from kedro.runner import SequentialRunner

from qmllm_pipeline.pipelines import data as data_pipeline
from qmllm_pipeline.pipelines import evaluate as evaluate_pipeline
from qmllm_pipeline.pipelines import features as features_pipeline
from qmllm_pipeline.pipelines import finetune as finetune_pipeline
from qmllm_pipeline.pipelines import foundation as foundation_pipeline
from qmllm_pipeline.pipelines import pretrain as pretrain_pipeline
from qmllm_pipeline.pipelines import safety_map as safety_map_pipeline
from qmllm_pipeline.settings import CONFIG_LOADER_ARGS
from qmllm_pipeline.world.catalogue import validate_catalogue
from qmllm_pipeline.world.render import default_font_path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
CATALOGUE_CSV = PROJECT_ROOT / "data" / "01_raw" / "emoji_catalogue.csv"


def load_parameters(env: str) -> dict:
    loader = OmegaConfigLoader(conf_source=str(PROJECT_ROOT / "conf"), env=env, **CONFIG_LOADER_ARGS)
    return loader["parameters"]


def read_raw_catalogue(path: Path = CATALOGUE_CSV) -> pd.DataFrame:
    return pd.read_csv(path, keep_default_na=False, dtype=str)


@pytest.fixture(scope="session")
def smoke_params() -> dict:
    return load_parameters("smoke")


@pytest.fixture(scope="session")
def raw_catalogue() -> pd.DataFrame:
    return read_raw_catalogue()


@pytest.fixture(scope="session")
def catalogue(raw_catalogue) -> pd.DataFrame:
    return validate_catalogue(raw_catalogue, default_font_path())


class KeptMemoryDataset(MemoryDataset):
    """A MemoryDataset the runner cannot release, so tests can read intermediate outputs afterwards."""

    def _release(self) -> None:
        pass


@pytest.fixture(scope="session")
def world(raw_catalogue, smoke_params) -> dict:
    """The `data` pipeline run once in memory on the smoke parameters (spaceflights-style test)."""
    return run_in_memory(data_pipeline.create_pipeline(),
                         {"emoji_catalogue_raw": raw_catalogue, "params:data": smoke_params["data"]})


def run_in_memory(pipeline, inputs: dict) -> dict:
    """Run a pipeline with a DataCatalog of in-memory inputs; return every output, intermediate ones too."""
    catalog = DataCatalog()
    for name, value in inputs.items():
        catalog[name] = value
    for name in pipeline.all_outputs():
        catalog[name] = KeptMemoryDataset(copy_mode="assign")
    SequentialRunner().run(pipeline, catalog)
    return {name: catalog.load(name) for name in pipeline.all_outputs()}


@pytest.fixture(scope="session")
def foundation(world, smoke_params) -> dict:
    """The `foundation` pipeline run once in memory on the smoke world."""
    inputs = {name: world[name] for name in ("text_corpus", "dialogs", "caption_corpus", "emoji_catalogue",
                                              "eval_items")}
    inputs.update({"params:foundation": smoke_params["foundation"], "params:data": smoke_params["data"]})
    return run_in_memory(foundation_pipeline.create_pipeline(), inputs)


@pytest.fixture(scope="session")
def stages(world, foundation, smoke_params) -> dict:
    """`features`, `pretrain` and `finetune` run once in memory on the smoke world and models."""
    inputs = {name: world[name] for name in ("caption_corpus", "dialogs", "text_corpus", "eval_utility",
                                              "eval_neutral", "dmap", "dmap_validation", "eval_toxic",
                                              "eval_hard_negative", "emoji_catalogue")}
    inputs.update({name: foundation[name] for name in ("tokenizer", "llm", "clip_model", "clip_image_processor")})
    inputs.update({f"params:{key}": smoke_params[key] for key in ("features", "pretrain", "finetune", "safety_map",
                                                                  "data")})
    inputs.update({f"params:variants.{name}": smoke_params["variants"][name] for name in ("qmllm", "baseline")})
    inputs["params:foundation.clip.text_side"] = smoke_params["foundation"]["clip"]["text_side"]
    chain = (features_pipeline.create_pipeline() + pretrain_pipeline.create_pipeline()
             + finetune_pipeline.create_pipeline() + safety_map_pipeline.create_pipeline())
    return run_in_memory(chain, inputs)


@pytest.fixture(scope="session")
def evaluation(world, foundation, stages, smoke_params) -> dict:
    """The `evaluate` pipeline run once in memory on the smoke models."""
    inputs = {name: world[name] for name in ("text_corpus", "eval_utility", "eval_neutral", "eval_toxic",
                                              "eval_hard_negative", "emoji_catalogue")}
    inputs.update({name: foundation[name] for name in ("tokenizer", "clip_model", "clip_image_processor")})
    inputs.update({name: stages[name] for name in ("qmllm.finetuned_llm", "qmllm.stage1_weights", "safety_map",
                                                   "baseline.finetuned_llm", "baseline.stage1_weights")})
    inputs.update({f"params:{key}": smoke_params[key] for key in ("pretrain", "features", "safety_map", "data",
                                                                  "evaluate")})
    pipeline = evaluate_pipeline.create_pipeline()
    for name in pipeline.inputs():
        if name.startswith(("params:evaluate.", "params:foundation.")):
            inputs[name] = _lookup(smoke_params, name.removeprefix("params:"))
    return run_in_memory(pipeline, inputs)


def _lookup(params: dict, dotted: str):
    for key in dotted.split("."):
        params = params[key]
    return params


def copy_project(destination: Path) -> Path:
    """Copy the project's configuration and raw data, so that `kedro run` in a test writes nothing here."""
    for item in ("pyproject.toml", ".telemetry"):
        shutil.copy(PROJECT_ROOT / item, destination / item)
    shutil.copytree(PROJECT_ROOT / "conf", destination / "conf", ignore=shutil.ignore_patterns("local"))
    (destination / "conf" / "local").mkdir()
    (destination / "src").mkdir()  # Kedro wants a source folder; the package itself is installed
    (destination / "data" / "01_raw").mkdir(parents=True)
    shutil.copy(CATALOGUE_CSV, destination / "data" / "01_raw" / CATALOGUE_CSV.name)
    return destination
