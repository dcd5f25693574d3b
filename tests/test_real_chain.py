"""The real environment end to end: `conf/real` as committed, over the miniature real inputs
(`qmllm_pipeline.fixtures`: a CLIP with CLIP-L's structure and its own BPE tokenizer, a Llama with Vicuna's
layout whose tokenizer lacks `<image>`, LLaVA-format data, D_map and evaluation folders, a harmful-instruction
file), in a copy of the project: `kedro run --env real --pipelines real` with the fixture's small settings."""

import hashlib
import json
import os
import shutil
from pathlib import Path

import pandas as pd
import pytest
from safetensors.torch import load_file

from qmllm_pipeline.fixtures import CLIP_DIR, FIXTURE_PARAMETERS, LLM_DIR, write_real_fixture
from qmllm_pipeline.loaders import BadInputError, load_instructions
from qmllm_pipeline.models.lora import load_adapted_llm

PROJECT = Path(__file__).resolve().parents[1]


def _digest(folder: Path) -> str:
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    return hashlib.sha256(b"".join(p.name.encode() + p.read_bytes() for p in files)).hexdigest()


@pytest.fixture(scope="module")
def real_run(tmp_path_factory):
    from kedro.framework.session import KedroSession
    from kedro.framework.startup import bootstrap_project

    root = tmp_path_factory.mktemp("real_project")
    shutil.copytree(PROJECT / "conf", root / "conf", ignore=shutil.ignore_patterns("local"))
    (root / "conf" / "local").mkdir()
    for name in ("pyproject.toml", ".telemetry"):
        shutil.copy(PROJECT / name, root / name)
    (root / "src").mkdir()  # the package is installed; Kedro only checks that the source folder exists
    raw = write_real_fixture(root / "data/01_raw/real")
    before = {name: _digest(raw / name) for name in (CLIP_DIR, LLM_DIR)}
    bootstrap_project(root)
    here = os.getcwd()
    os.chdir(root)  # `kedro run` runs in the project root: the configuration's paths are relative to it
    try:
        with KedroSession.create(project_path=root, env="real", runtime_params=FIXTURE_PARAMETERS) as session:
            session.run(pipeline_names=["real"])
    finally:
        os.chdir(here)
        bootstrap_project(PROJECT)
    return root, before


def test_every_pipeline_of_the_real_path_runs_and_writes_its_outputs(real_run):
    root, before = real_run
    out = root / "data/real"
    for path in ("03_primary/caption_corpus.parquet", "03_primary/text_corpus.parquet",
                 "04_feature/caption_targets.safetensors", "06_models/qmllm/stage1.safetensors",
                 "06_models/baseline/llm/adapted_llm.json", "06_models/qmllm/safety_map.parquet",
                 "06_models/qmllm/guarded.json", "08_reporting/evaluation_report.md", "metrics/evaluate.json"):
        assert (out / path).is_file(), path
    assert not (root / "data/03_primary").exists()  # nothing written where a default run writes
    assert not list((out / "04_feature").glob("*_features*"))  # features.cache false: the tower runs per batch
    assert "image" not in pd.read_parquet(out / "03_primary/caption_corpus.parquet")  # a manifest, not pixels
    raw = root / "data/01_raw/real"
    assert {name: _digest(raw / name) for name in (CLIP_DIR, LLM_DIR)} == before  # real weights untouched
    report = json.loads((out / "08_reporting/ingest_report.json").read_text())
    assert report["dialogs"]["text_only"] == 1 and report["skipped_total"] == 0
    metrics = json.loads((out / "metrics/evaluate.json").read_text())
    assert set(metrics["jailbreak"]) >= {"eps16", "eps32", "eps64", "unconstrained"}


def test_the_real_tokenizer_gets_the_image_token_and_the_llm_its_row(real_run):
    from transformers import AutoTokenizer

    root, _ = real_run
    raw_tokenizer = AutoTokenizer.from_pretrained(root / "data/01_raw/real" / LLM_DIR)
    assert "<image>" not in raw_tokenizer.get_vocab()
    config = json.loads((root / "data/real/06_models/qmllm/config.json").read_text())
    assert config["conversation_format"] == "vicuna_v1" and config["image_token_id"] == len(raw_tokenizer)
    folder = root / "data/real/06_models/qmllm/llm"
    assert [p.name for p in folder.iterdir()] == ["adapted_llm.json"]  # the base plus the adapters, not a copy
    llm = load_adapted_llm(folder)
    assert llm.get_input_embeddings().weight.shape[0] == len(raw_tokenizer) + 1
    assert "lora_A" not in " ".join(llm.state_dict())  # the adapters merged as it loads


def test_the_lora_adapter_is_saved_alone_and_gives_the_merged_llm_on_the_base(real_run):
    import torch
    from peft import PeftModel

    from qmllm_pipeline.datasets import HFModelDirectoryDataset

    root, _ = real_run
    adapter = root / "data/real/06_models/qmllm/lora_adapter"
    assert {p.name for p in adapter.iterdir()} >= {"adapter_config.json", "adapter_model.safetensors"}  # peft's layout
    raw = root / "data/01_raw/real" / LLM_DIR
    base = HFModelDirectoryDataset(str(raw), "transformers.LlamaForCausalLM", load_args={"dtype": "bfloat16"},
                                   prepare_for_images="vicuna_v1", tokenizer_path=str(raw)).load()
    adapted = PeftModel.from_pretrained(base, adapter).eval()
    merged = HFModelDirectoryDataset(str(root / "data/real/06_models/qmllm/llm"),
                                     "transformers.LlamaForCausalLM").load()
    ids = torch.tensor([[1, 40, 50, 60, 70, 2]])
    with torch.no_grad():
        difference = (adapted(input_ids=ids).logits.float() - merged(input_ids=ids).logits.float()).abs().max()
    assert difference < 0.05  # bfloat16 weights: the merge rounds once


def test_the_saved_real_model_loads_and_answers_from_its_directory(real_run):
    from PIL import Image

    from qmllm_pipeline.models.clip import decode_images
    from qmllm_pipeline.models.guarded import GuardedQMLLM
    from qmllm_pipeline.world.render import png_bytes

    root, _ = real_run
    guarded = GuardedQMLLM.from_manifest(root / "data/real/06_models/qmllm/guarded.json")  # what `qmllm chat` loads
    assert guarded.tokenizer.convert_tokens_to_ids("<image>") == guarded.model.config.image_token_id
    assert guarded.tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                                 add_generation_prompt=True).endswith("USER: Hi ASSISTANT:")
    image = Image.open(root / "data/01_raw/real/eval/neutral/0.jpg").convert("RGB")
    answer = guarded.respond(decode_images([png_bytes(image.resize((56, 56)))], desc=None), ["What is it?"], 3, 1)
    assert len(answer) == 1  # random weights: the answer says nothing, the path is what is tested


def test_harmful_instructions_load_from_text_or_csv_and_bad_files_are_named(tmp_path):
    text = tmp_path / "harmful.txt"
    text.write_text("# comment\nTell me how to do a bad thing.\n\nAnother bad thing.\n")
    assert list(load_instructions(text)["instruction"]) == ["Tell me how to do a bad thing.", "Another bad thing."]
    table = tmp_path / "harmful_behaviors.csv"
    table.write_text('goal,target\n"Do X","Sure, here is X"\n"Do Y",\n')
    loaded = load_instructions(table, "goal", "target", default_target="Sure")
    assert list(loaded["target"]) == ["Sure, here is X", "Sure"]
    with pytest.raises(BadInputError, match=r"harmful_behaviors.csv: no column 'prompt'"):
        load_instructions(table, "prompt")
    with pytest.raises(BadInputError, match="missing.txt: harmful-instruction file not found"):
        load_instructions(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("# nothing\n")
    with pytest.raises(BadInputError, match="empty.txt: no instructions in it"):
        load_instructions(tmp_path / "empty.txt")


def test_with_the_feature_cache_on_the_real_path_writes_shards_and_trains_on_them(tmp_path):
    """`features.cache: true`: the features written in shards of `rows_per_shard` images, stage 1 reading them
    a batch at a time (`kedro run` in its own process: its own MLflow run)."""
    import subprocess
    import sys

    from qmllm_pipeline.data_scale import project_copy
    from qmllm_pipeline.dotted import with_overrides
    from qmllm_pipeline.fixtures import params_line

    root = project_copy(PROJECT, tmp_path / "project")
    write_real_fixture(root / "data/01_raw/real")
    params = with_overrides(FIXTURE_PARAMETERS, **{"features.cache": True, "features.rows_per_shard": 8})
    done = subprocess.run([sys.executable, "-m", "kedro", "run", "--env", "real", "--pipelines",
                           "ingest,features,pretrain", "--params", params_line(params)], cwd=root,
                          capture_output=True, text=True, env={**os.environ, "KEDRO_DISABLE_TELEMETRY": "true"})
    assert done.returncode == 0, done.stderr[-3000:]
    shards = sorted(p.name for p in (root / "data/real/04_feature/caption_features").iterdir())
    assert shards == ["shard-00000.safetensors", "shard-00001.safetensors"]  # 16 images, 8 a shard
    assert load_file(root / "data/real/04_feature/caption_features/shard-00001.safetensors")["cls"].shape[0] == 8
    assert (root / "data/real/06_models/qmllm/stage1.safetensors").is_file()
