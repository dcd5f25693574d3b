"""Shared fixtures. Torch tests must not run in parallel processes (2 cores: oversubscription)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from qmllm_pipeline.in_memory import run_in_memory
from qmllm_pipeline.parameters import load_parameters as load_project_parameters
from qmllm_pipeline.pipelines import data as data_pipeline
from qmllm_pipeline.pipelines import evaluate as evaluate_pipeline
from qmllm_pipeline.pipelines import features as features_pipeline
from qmllm_pipeline.pipelines import finetune as finetune_pipeline
from qmllm_pipeline.pipelines import foundation as foundation_pipeline
from qmllm_pipeline.pipelines import pretrain as pretrain_pipeline
from qmllm_pipeline.pipelines import safety_map as safety_map_pipeline
from qmllm_pipeline.world.catalogue import validate_catalogue
from qmllm_pipeline.world.render import default_font_path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
CATALOGUE_CSV = PROJECT_ROOT / "data" / "01_raw" / "emoji_catalogue.csv"
# fixtures that train models or run pipelines: a test that uses one is `slow` (pytest -m "not slow" skips it)
KEDRO = [sys.executable, "-m", "kedro"]
SLOW_FIXTURES = {"world", "foundation", "stages", "evaluation", "smoke_run"}


def pytest_collection_modifyitems(items) -> None:
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


def load_parameters(env: str) -> dict:
    return load_project_parameters(env, PROJECT_ROOT / "conf")


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


@pytest.fixture(scope="session")
def world(raw_catalogue, smoke_params) -> dict:
    """The `data` pipeline run once in memory on the smoke parameters (spaceflights-style test)."""
    return run_in_memory(data_pipeline.create_pipeline(), {"emoji_catalogue_raw": raw_catalogue}, smoke_params)


FOUNDATION_MODELS = ("tokenizer", "clip_model", "clip_image_processor", "llm")


@pytest.fixture(scope="session")
def foundation(world, smoke_params) -> dict:
    """The `foundation` pipeline run once in memory on the smoke world; its `trained_*` models also under the
    names the chain reads (as if promoted to the shipped set)."""
    inputs = {name: world[name] for name in ("text_corpus", "dialogs", "caption_corpus", "emoji_catalogue",
                                              "eval_items")}
    trained = run_in_memory(foundation_pipeline.create_pipeline(), inputs, smoke_params)
    shipped = {name: trained[f"trained_{name}"] for name in FOUNDATION_MODELS}
    return {**trained, **shipped, "clip_tokenizer": shipped["tokenizer"]}  # the stand-ins share one tokenizer


@pytest.fixture(scope="session")
def stages(world, foundation, smoke_params) -> dict:
    """`features`, `pretrain`, `finetune` and `safety_map` run once in memory on the smoke world and models."""
    inputs = {name: world[name] for name in ("caption_corpus", "dialogs", "text_corpus", "eval_utility",
                                              "eval_neutral", "dmap", "dmap_validation", "eval_toxic",
                                              "eval_hard_negative", "emoji_catalogue", "eval_items")}
    inputs.update({name: foundation[name] for name in (*FOUNDATION_MODELS, "clip_tokenizer")})
    chain = (features_pipeline.create_pipeline() + pretrain_pipeline.create_pipeline(smoke_params)
             + finetune_pipeline.create_pipeline(smoke_params) + safety_map_pipeline.create_pipeline())
    return run_in_memory(chain, inputs, smoke_params)


@pytest.fixture(scope="session")
def evaluation(world, foundation, stages, smoke_params) -> dict:
    """The `evaluate` pipeline run once in memory on the smoke models."""
    inputs = {name: world[name] for name in ("text_corpus", "eval_utility", "eval_neutral", "eval_toxic",
                                              "eval_hard_negative", "emoji_catalogue")}
    inputs.update({name: foundation[name] for name in ("tokenizer", "clip_tokenizer", "clip_model",
                                                       "clip_image_processor")})
    inputs.update({f"{variant}.{name}": stages[f"{variant}.{name}"] for variant in ("qmllm", "baseline")
                   for name in ("qmllm_config", "stage1_weights", "finetuned_llm")})
    inputs["safety_map"] = stages["safety_map"]
    return run_in_memory(evaluate_pipeline.create_pipeline(smoke_params), inputs, smoke_params)


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


def run_checked(command: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    """`command` in `cwd` (telemetry off), which must succeed; its output in the failure message."""
    env = dict(os.environ, KEDRO_DISABLE_TELEMETRY="true", DO_NOT_TRACK="1", COLUMNS="200")
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory) -> Path:
    """In a copy of the project: the smoke world and its own tiny foundation set (`--pipelines
    data,foundation`), then `kedro run --env smoke`, the whole default chain reading that set (shared by every
    test file; a test that changes its files puts them back)."""
    root = copy_project(tmp_path_factory.mktemp("project"))
    run_checked([*KEDRO, "run", "--env", "smoke", "--pipelines", "data,foundation"], cwd=root)
    run_checked([*KEDRO, "run", "--env", "smoke"], cwd=root)
    return root
