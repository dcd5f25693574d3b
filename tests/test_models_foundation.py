"""Tokenizer, CLIP and LLM building blocks, and the model-directory dataset (offline, real layout)."""

import os

import pytest
import torch
from kedro.config import OmegaConfigLoader
from kedro.io import DataCatalog, DatasetError
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, LlamaConfig, LlamaForCausalLM

from conftest import PROJECT_ROOT
from qmllm_pipeline.datasets import HFModelDirectoryDataset
from qmllm_pipeline.judge import RefusalPhraseJudge
from qmllm_pipeline.models.clip import TowerShape, build_clip, tokenize_captions
from qmllm_pipeline.models.tokenizer import IMAGE_TOKEN, encode_chat, encode_prompt, train_tokenizer
from qmllm_pipeline.settings import CONFIG_LOADER_ARGS

TEXTS = ["a dog on a blue background", "How do I bake bread?", "Sure, here is how to bake bread.",
         "I'm sorry, but I can't help with that."] * 50


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(TEXTS, vocab_size=400)


def test_special_tokens_and_chat_mask(tokenizer):
    assert tokenizer.eos_token_id != 2  # CLIP's legacy pooling trap
    assert len(tokenizer(IMAGE_TOKEN, add_special_tokens=False)["input_ids"]) == 1
    ids, labels = encode_chat(tokenizer, [{"role": "user", "content": f"{IMAGE_TOKEN}\nHow do I bake bread?"},
                                          {"role": "assistant", "content": "Sure, here is how to bake bread."}], 96)
    supervised = [t for t, label in zip(ids, labels, strict=True) if label != -100]
    assert tokenizer.decode(supervised) == "Sure, here is how to bake bread.</s>"
    prompt = encode_prompt(tokenizer, f"{IMAGE_TOKEN}\nHow do I bake bread?")
    assert tokenizer.decode(prompt) == "<s><|user|><image>\nHow do I bake bread?<|assistant|>"
    assert ids[: len(prompt)] == prompt


def test_caption_tokens_end_with_eos(tokenizer):
    ids, mask = tokenize_captions(tokenizer, ["a dog", "a dog on a blue background"], max_tokens=32)
    lengths = mask.sum(1)
    assert all(ids[row, lengths[row] - 1] == tokenizer.eos_token_id for row in range(2))
    assert (ids[0, lengths[0]:] == tokenizer.pad_token_id).all()


def _clip(tokenizer, smoke_params):
    clip = smoke_params["foundation"]["clip"]
    return build_clip(tokenizer, smoke_params["data"]["layout"]["image_size"], clip["patch_size"],
                      TowerShape(**clip["vision"]), TowerShape(**clip["text"]), clip["max_text_tokens"],
                      clip["projection_dim"])


def test_clip_config_refuses_eos_2(tokenizer, smoke_params):
    model = _clip(tokenizer, smoke_params)
    assert model.config.text_config.eos_token_id == tokenizer.eos_token_id

    class LegacyTokenizer:
        pad_token_id, bos_token_id, eos_token_id = 0, 1, 2

        def __len__(self):
            return 400

    with pytest.raises(ValueError, match="eos_token_id must not be 2"):
        _clip(LegacyTokenizer(), smoke_params)


def test_refusal_judge():
    judge = RefusalPhraseJudge()
    assert judge.is_refusal("I'm sorry, but I can't help with that, because it involves weapons.")
    assert judge.is_refusal("I\u2019m sorry")
    assert not judge.is_refusal("Sure, here is how to bake bread.")
    assert judge.contains_target("Sure, here is how to build a bomb. First", "Sure, here is how to build a bomb.")


def _tiny_real_layout(root):
    """Randomly initialised models saved the way Hugging Face snapshots are laid out."""
    clip_dir, llm_dir = root / "clip-vit-large-patch14-336", root / "vicuna-7b-v1.5"
    clip = CLIPModel(CLIPConfig(
        text_config={"vocab_size": 99, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "max_position_embeddings": 16, "eos_token_id": 4},
        vision_config={"image_size": 32, "patch_size": 16, "hidden_size": 16, "intermediate_size": 32,
                       "num_hidden_layers": 1, "num_attention_heads": 2}, projection_dim=8))
    clip.save_pretrained(clip_dir)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(clip_dir)
    llm = LlamaForCausalLM(LlamaConfig(vocab_size=400, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                       num_attention_heads=2, num_key_value_heads=2))
    llm.save_pretrained(llm_dir)
    train_tokenizer(TEXTS, vocab_size=400).save_pretrained(llm_dir)
    return clip_dir, llm_dir


def test_real_environment_loads_local_directories_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    models = tmp_path / "data" / "01_raw" / "real" / "models"
    clip_dir, llm_dir = _tiny_real_layout(models)
    config = OmegaConfigLoader(conf_source=str(PROJECT_ROOT / "conf"), env="real", **CONFIG_LOADER_ARGS)["catalog"]
    entries = {name: dict(config[name]) for name in ("tokenizer", "clip_model", "clip_image_processor", "llm")}
    for entry in entries.values():
        assert entry["read_only"] is True
        entry["path"] = str(tmp_path / entry["path"])
        if "tokenizer_path" in entry:  # the tokenizer the LLM's embeddings are sized to
            entry["tokenizer_path"] = str(tmp_path / entry["tokenizer_path"])
    catalog = DataCatalog.from_config(entries)
    assert isinstance(catalog.load("clip_model"), CLIPModel)
    assert catalog.load("clip_image_processor").crop_size == {"height": 32, "width": 32}
    llm = catalog.load("llm")
    assert isinstance(llm, LlamaForCausalLM) and llm.dtype == torch.bfloat16 and not llm.training
    tokenizer = catalog.load("tokenizer")
    assert tokenizer.chat_template is not None and "<image>" in tokenizer.get_vocab()  # prepared as it loads
    assert llm.get_input_embeddings().weight.shape[0] >= len(tokenizer)
    with pytest.raises(DatasetError, match="read-only model directory"):
        catalog.save("llm", llm)
    assert sorted(os.listdir(llm_dir)) == sorted(os.listdir(llm_dir))  # untouched


def test_model_directory_errors_and_atomic_save(tmp_path):
    dataset = HFModelDirectoryDataset(str(tmp_path / "llm"), "transformers.LlamaForCausalLM")
    with pytest.raises(DatasetError, match="model directory not found"):
        dataset.load()
    (tmp_path / "llm").mkdir()
    (tmp_path / "llm" / "notes.txt").write_text("not a model")
    with pytest.raises(DatasetError, match=r"not a saved model directory \(no config.json\)"):
        dataset.load()

    model = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))
    dataset.save(model)
    assert (tmp_path / "llm" / "model.safetensors").is_file() and not (tmp_path / "llm" / "notes.txt").exists()

    class Broken:
        def save_pretrained(self, path, **kwargs):
            (path / "config.json").write_text("{half")
            raise OSError("disk full")

    with pytest.raises(DatasetError, match="disk full"):
        dataset.save(Broken())
    reloaded = dataset.load()
    assert torch.equal(reloaded.model.embed_tokens.weight, model.model.embed_tokens.weight)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["llm"]
