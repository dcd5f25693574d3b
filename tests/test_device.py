"""The `device` setting: names resolve to this machine's devices or fail with the reason, and every node that
runs a model outside the training loop puts it on the accelerator, with its inputs and results where they
belong. No GPU is lent here, so the nodes run on a stand-in (`fake_accelerator.py`): tensors "on cuda" are
CPU tensors checked as CUDA checks them, so the figures must come out exactly as the CPU run's."""

from __future__ import annotations

import copy

import pandas as pd
import pytest
import torch

from fake_accelerator import fake_cuda
from qmllm_pipeline.in_memory import run_in_memory
from qmllm_pipeline.models.device import resolve_device
from qmllm_pipeline.models.feature_shards import gather
from qmllm_pipeline.models.training import RunSettings
from qmllm_pipeline.pipelines import evaluate as evaluate_pipeline
from qmllm_pipeline.pipelines import features as features_pipeline
from qmllm_pipeline.pipelines import safety_map as safety_map_pipeline
from qmllm_pipeline.pipelines.finetune import nodes as finetune_nodes

MODELS = ("tokenizer", "clip_model", "clip_image_processor", "llm", "clip_tokenizer")


def test_device_names_resolve_to_this_machine_or_fail_with_the_reason():
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="not a torch device"):
        resolve_device("gpu0")
    with pytest.raises(ValueError, match="only cpu and cuda"):
        resolve_device("meta")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="torch sees no CUDA device here"):
            resolve_device("cuda")
        with pytest.raises(ValueError, match="no CUDA"):  # a run fails before anything runs
            RunSettings.from_params(0, "x", None, "cuda:1")


def test_the_stand_in_catches_what_cuda_would(monkeypatch):
    """The stand-in is only worth its word if it fails where CUDA fails."""
    with fake_cuda(monkeypatch):
        layer = torch.nn.Linear(3, 2).to(resolve_device("auto"))
        assert layer.weight.device.type == "cuda"
        with pytest.raises(RuntimeError, match="same device"):
            layer(torch.ones(4, 3))
        out = layer(torch.ones(4, 3).to(layer.weight.device))
        with pytest.raises(TypeError, match="numpy"):
            out.detach().numpy()
        leaf = torch.ones(4, 3, requires_grad=True)
        grad = torch.autograd.grad(layer(leaf.to("cuda")).sum(), leaf)[0]
        assert grad.device.type == "cpu"  # the gradient goes back to where the input came from
        assert out.detach().cpu().numpy().shape == (4, 2)


def _models(foundation: dict) -> dict:
    """Copies of the foundation models: moving them must not move the session's shared ones."""
    return {name: copy.deepcopy(foundation[name]) for name in MODELS}


def test_features_run_on_the_accelerator_and_come_back_identical(world, foundation, stages, smoke_params,
                                                                  monkeypatch):
    inputs = {"caption_corpus": world["caption_corpus"], "dialogs": world["dialogs"], **_models(foundation)}
    with fake_cuda(monkeypatch) as device:
        out = run_in_memory(features_pipeline.create_pipeline(), inputs, smoke_params)
    assert device.checked > 1000  # the tower, the LLM and CLIP's text side ran "on the device"
    for name in ("caption_features", "dialog_features"):
        on_device, on_cpu = gather(out[name]), gather(stages[name])
        assert all(type(t) is torch.Tensor and torch.equal(t, on_cpu[key]) for key, t in on_device.items())
    assert all(torch.equal(out["caption_targets"][k], stages["caption_targets"][k]) for k in stages["caption_targets"])


def test_the_safety_map_and_the_evaluation_run_on_the_accelerator_with_the_cpu_figures(
        world, foundation, stages, evaluation, smoke_params, monkeypatch):
    """Every model of the safety map and the evaluation (the CLS path, SafeCLIP, both frozen variants: scoring,
    generation, every attacker at the first budget, the code-space search) on the stand-in device: the same
    verdicts, answers and rates as on the CPU; only the timings differ. (One budget: the others run the same
    code; the search starts from the CPU run's attacks at every budget. Code stability runs the same attacks,
    and the overhead only times queries.)"""
    splits = ("dmap", "dmap_validation", "eval_toxic", "eval_neutral", "eval_hard_negative", "emoji_catalogue",
              "text_corpus", "eval_utility")
    trained = {f"{v}.{name}": stages[f"{v}.{name}"] for v in ("qmllm", "baseline")
               for name in ("qmllm_config", "stage1_weights", "lora_adapter")}
    llms = {f"{v}.finetuned_llm": copy.deepcopy(stages[f"{v}.finetuned_llm"]) for v in ("qmllm", "baseline")}
    inputs = {**{name: world[name] for name in splits}, **_models(foundation), **trained, **llms,
              "jailbreak_results": evaluation["jailbreak_results"]}
    budget = next(iter(smoke_params["evaluate"]["budgets"]))
    evaluate = evaluate_pipeline.create_pipeline(smoke_params)
    other_budgets = tuple(f"jailbreak_{name}." for name in smoke_params["evaluate"]["budgets"] if name != budget)
    kept = [n.name for n in evaluate.nodes if not n.name.startswith(other_budgets)
            and n.name not in ("collect_jailbreaks", "jailbreak_summary", "evaluation_report", "overhead",
                               "code_stability")]
    chain = safety_map_pipeline.create_pipeline() + evaluate.only_nodes(*kept)
    with fake_cuda(monkeypatch):
        out = run_in_memory(chain, inputs, smoke_params)
    assert out["evaluation_systems"]["qmllm"].model.device.type == "cuda"
    assert out["safeclip_filter"].class_embeds.device.type == "cuda"
    pd.testing.assert_frame_equal(out["safety_map"], stages["safety_map"])
    pd.testing.assert_frame_equal(out["toxic_image_responses"], evaluation["toxic_image_responses"])
    for name in ("toxic_image_metrics", "utility_metrics", "jailbreak_clean", "code_space_bound"):
        assert _figures(out[name]) == _figures(evaluation[name]), name
    results = f"jailbreak_{budget}.jailbreak_results"
    on_device, on_cpu = out[results], evaluation[results]
    assert _figures(on_device["results"]) == _figures(on_cpu["results"])
    assert all(torch.equal(on_device["images"][k], on_cpu["images"][k]) for k in on_cpu["images"])


def test_the_finetune_checks_run_where_the_run_settings_put_them(world, foundation, stages, smoke_params,
                                                                   monkeypatch):
    run = {"distributed": smoke_params["distributed"]}
    with fake_cuda(monkeypatch):
        on_device = RunSettings.from_params(0, "unused", run["distributed"], "auto")
        assert on_device.node_device.type == "cuda"
        forking = RunSettings.from_params(0, "unused", {**run["distributed"], "num_processes": 2}, "auto")
        assert forking.node_device.type == "cpu"  # its workers fork: the parent keeps off CUDA
        model = finetune_nodes.variant_model(stages["qmllm.qmllm_config"], stages["qmllm.stage1_weights"],
                                             copy.deepcopy(stages["qmllm.finetuned_llm"]),
                                             copy.deepcopy(foundation["clip_model"]), on_device)
        guarded = finetune_nodes.finetuned_model(model, foundation["tokenizer"], foundation["clip_image_processor"])
        scores = finetune_nodes.variant_utility(guarded, world["eval_utility"], smoke_params["finetune"]["evaluation"])
    assert model.device.type == "cuda"
    assert scores == stages["qmllm.utility_scores"]


def _figures(metrics: dict) -> dict:
    """The metrics without the wall-clock ones (times and their ratios)."""
    if isinstance(metrics, dict):
        return {k: _figures(v) for k, v in metrics.items()
                if not any(w in k for w in ("_ms", "ms_", "seconds", "time", "_over_"))}
    return metrics
