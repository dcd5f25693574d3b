"""The `foundation` pipeline on the smoke world: it trains, saves and measures (quality is measured on
the default configuration; smoke only has a few dozen steps)."""

import json

import pytest
import torch
from matplotlib.figure import Figure
from transformers import CLIPModel, LlamaForCausalLM

from qmllm_pipeline.datasets import AtomicJSONDataset, HFModelDirectoryDataset


def test_outputs_and_metrics(foundation):
    assert isinstance(foundation["clip_model"], CLIPModel) and isinstance(foundation["llm"], LlamaForCausalLM)
    assert isinstance(foundation["clip_loss_curve"], Figure) and isinstance(foundation["llm_loss_curve"], Figure)
    report = foundation["foundation_metrics"]
    for value in (report["clip"]["top1"], report["clip"]["top5"], report["llm"]["heldout_harmful_refused"],
                  report["llm"]["heldout_benign_refused"]):
        assert 0.0 <= value <= 1.0
    assert report["clip"]["top1"] <= report["clip"]["top5"]
    assert report["clip"]["zero_shot_classes"] == 333
    assert report["llm"]["heldout_counts"]["harmful"] > 0 and report["llm"]["heldout_counts"]["benign"] > 0
    assert set(report["goals"]) == {"clip_top1_at_least_0.50", "clip_top5_at_least_0.80",
                                    "llm_heldout_harmful_refused_at_least_0.95",
                                    "llm_heldout_benign_refused_at_most_0.05"}
    assert json.loads(json.dumps(report)) == report  # the metrics file must be plain JSON


@pytest.mark.parametrize("name", ["clip_training", "llm_training"])
def test_training_lowers_the_loss(foundation, name):
    summary = foundation[name]
    assert summary["steps"] == 30 and summary["seconds"] > 0
    # A few dozen steps from random initialisation must already reduce the loss.
    assert summary["final_loss"] < summary["initial_loss"], summary


def test_models_round_trip_through_the_catalogue(foundation, tmp_path):
    for name, cls in [("clip_model", "transformers.CLIPModel"), ("llm", "transformers.LlamaForCausalLM"),
                      ("tokenizer", "transformers.AutoTokenizer"),
                      ("clip_image_processor", "transformers.CLIPImageProcessor")]:
        dataset = HFModelDirectoryDataset(str(tmp_path / name), cls)
        dataset.save(foundation[name])
        loaded = dataset.load()
        if hasattr(loaded, "state_dict"):
            original = foundation[name].state_dict()
            assert loaded.state_dict().keys() == original.keys()
            assert all(torch.equal(loaded.state_dict()[k], v) for k, v in original.items())
    tokenizer = HFModelDirectoryDataset(str(tmp_path / "tokenizer"), "transformers.AutoTokenizer").load()
    assert tokenizer.eos_token_id == foundation["tokenizer"].eos_token_id != 2
    processor = HFModelDirectoryDataset(str(tmp_path / "clip_image_processor"),
                                        "transformers.CLIPImageProcessor").load()
    assert processor.crop_size == foundation["clip_image_processor"].crop_size
    metrics = AtomicJSONDataset(str(tmp_path / "foundation.json"))
    metrics.save(foundation["foundation_metrics"])
    assert metrics.load() == json.loads(json.dumps(foundation["foundation_metrics"]))
