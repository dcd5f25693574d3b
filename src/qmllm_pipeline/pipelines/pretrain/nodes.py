"""Nodes of the `pretrain` pipeline (stage 1), instantiated per variant (`qmllm`, `baseline`) by namespace."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from qmllm_pipeline.constants import IMAGE_TOKEN
from qmllm_pipeline.models.checkpoint import TrainingCheckpoint
from qmllm_pipeline.models.conversation import conversation_format_of
from qmllm_pipeline.models.distributed import DistributedSettings
from qmllm_pipeline.models.names import NameHead, slot_targets
from qmllm_pipeline.models.qmllm import QMLLM, QMLLMConfig
from qmllm_pipeline.models.stages import (
    STAGE1_WITH_HEAD,
    Example,
    caption_examples,
    code_indices,
    paper_stage1_config,
    pretrain,
    train_cls_head,
    train_name_head,
    with_stage1_patch_path,
)
from qmllm_pipeline.models.training import TrainingConfig, loss_curve_figure, seed_everything
from qmllm_pipeline.tracking import StepLogger, log_summary_metrics

logger = logging.getLogger(__name__)


def model_config(tokenizer, llm, caption_features: dict, caption_targets: dict, model: dict, vision_tower: dict,
                 cls_head_features: dict, name_vocabulary: dict, name_head: dict, variant: dict) -> dict:
    """The variant's `QMLLMConfig`: the architecture in `pretrain.model`, the vision tower's settings
    (`features.vision_tower`; on the decoupled path the CLS source is `features.cls_head`'s), the name head's
    (`pretrain.name_head`, reading `features.cls_head`'s CLS feature; `slots: 0` leaves it out), and the
    widths and `<image>` id of the models it sits between (the CLS feature's and the semantic target's widths
    size the CLS path)."""
    decoupled = variant["quantized"] and model.get("cls_path", "shared") == "decoupled"
    config = QMLLMConfig(
        vision_width=int(caption_features["patches"].shape[-1]), llm_width=llm.config.hidden_size,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), variant=variant["name"],
        conversation_format=conversation_format_of(tokenizer),
        quantized=variant["quantized"], mm_vision_select_layer=vision_tower["select_layer"],
        cls_source=cls_head_features["cls_source"] if decoupled else vision_tower["cls_source"],
        mm_patch_pool=vision_tower["patch_pool"], num_patches=int(caption_features["patches"].shape[1]), **model,
        **_cls_widths(caption_features, caption_targets, decoupled),
        **_name_head_fields(caption_features, name_vocabulary, name_head, cls_head_features["cls_source"]))
    return config.to_dict()


def _name_head_fields(caption_features: dict, vocabulary: dict, params: dict, cls_source: str) -> dict:
    if not params["slots"]:
        return {}
    return {"name_slots": params["slots"] + bool(params["background"]), "name_background": bool(params["background"]),
            "name_slot_width": vocabulary["slot_width"], "name_position": params["position"],
            "name_vocabulary": list(vocabulary["names"]), "name_cls_source": cls_source,
            "name_cls_width": int(caption_features["head_cls"].shape[-1]), "name_head_inputs": params["inputs"],
            "name_head_hidden": params["hidden"], "name_head_patch_dim": params["patch_dim"],
            "name_counted": params["slots"] if params["count"] else 0}


def name_vocabulary(emoji_catalogue: pd.DataFrame, tokenizer, backgrounds: dict, params: dict) -> dict:
    """The name head's closed vocabulary: every catalogue name, in catalogue order, then (with a background
    slot, `params`: pretrain.name_head) the background colours, sorted; each spelled in the LLM's tokens as it
    follows an article in an answer (' pistol', ' red'), and the widest spelling (a slot's width)."""
    names = [str(name) for name in emoji_catalogue["name"]]
    colours = sorted(backgrounds) if params["background"] else []
    token_ids = [tokenizer(f" {name}", add_special_tokens=False)["input_ids"] for name in names + colours]
    return {"names": names + colours, "item_ids": [int(i) for i in emoji_catalogue["item_id"]],
            "backgrounds": colours, "token_ids": token_ids, "slot_width": max(len(ids) for ids in token_ids),
            "pad_id": int(tokenizer.pad_token_id)}


def build_name_head(vocabulary: dict, caption_features: dict, params: dict) -> NameHead:
    """An untrained name head of the shape `model_config` gives the models (`params`: pretrain.name_head)."""
    head = NameHead(len(vocabulary["names"]), params["slots"] + bool(params["background"]), vocabulary["slot_width"],
                    int(caption_features["head_cls"].shape[-1]), int(caption_features["patches"].shape[-1]),
                    int(caption_features["patches"].shape[1]), params["inputs"], params["hidden"], params["patch_dim"],
                    params["dropout"], counted=params["slots"] if params["count"] else 0)
    return head.set_vocabulary(vocabulary["token_ids"], vocabulary["pad_id"])


def name_head_weights(caption_features: dict, caption_corpus: pd.DataFrame, name_vocabulary: dict, params: dict,
                      seed: int, checkpoint_dir: str) -> tuple[dict, dict]:
    """The name head, trained once on the caption corpus's cached features and object lists, for both variants
    (they read the same names: the quantized one its argmax, the baseline its softmax). `params`:
    pretrain.name_head; with `slots: 0` there is no head (empty weights)."""
    if not params["slots"]:
        return {}, {"slots": 0}
    if "item_ids" not in caption_corpus.columns:
        raise ValueError("caption_corpus has no item_ids column: its scenes name no catalogue objects (ingested "
                         "data), so there is nothing to train the name head on; set pretrain.name_head.slots: 0 "
                         "(as conf/real/parameters_pretrain.yml does)")
    seed_everything(seed)
    head = build_name_head(name_vocabulary, caption_features, params)
    targets = slot_targets(list(caption_corpus["item_ids"]), name_vocabulary["item_ids"], params["slots"],
                           list(caption_corpus["background"]) if params["background"] else None,
                           name_vocabulary["backgrounds"])
    training = TrainingConfig(**params["training"])
    checkpoint = TrainingCheckpoint(Path(checkpoint_dir) / "name_head", {"params": params, "seed": seed,
                                                                         "rows": len(targets)})
    step_logger = StepLogger("name_head", every=params["log_every"])
    started = time.perf_counter()
    train_name_head(head, caption_features["head_cls"], caption_features["patches"], targets, training, seed,
                    step_logger, checkpoint)
    summary = {"slots": params["slots"], "background": bool(params["background"]), "count": bool(params["count"]),
               "inputs": params["inputs"],
               "names": len(name_vocabulary["names"]),
               "slot_width": name_vocabulary["slot_width"], "seconds": round(time.perf_counter() - started, 1),
               "steps": training.steps, "final": _final_losses(step_logger)}
    logger.info("name head: %.0f s, final %s", summary["seconds"], summary["final"])
    return {k: v.detach().clone() for k, v in head.state_dict().items()}, summary


def _cls_widths(caption_features: dict, caption_targets: dict, decoupled: bool) -> dict:
    """The decoupled CLS head's feature and target widths (the shared path's are the projector's)."""
    if not decoupled:
        return {}
    return {"cls_vision_width": int(caption_features["head_cls"].shape[-1]),
            "cls_width": int(caption_targets["head_targets"].shape[-1])}


def tokenized_captions(caption_corpus: pd.DataFrame, tokenizer, instruction: str, max_length: int) -> list[Example]:
    """Stage 1's examples: `<image>\\n{instruction}` -> caption, one per caption-corpus row."""
    return caption_examples(list(caption_corpus["caption"]), tokenizer, instruction, max_length)


def semantic_targets(targets: torch.Tensor, standardize: bool) -> torch.Tensor:
    """L_semantic's target, optionally standardised per dimension (spreads the CLS codes; see DESIGN.md)."""
    values = targets.float()
    if standardize:
        values = (values - values.mean(0)) / values.std(0).clamp(min=1e-6)
    return values


def pretrain_variant(qmllm_config: dict, caption_features: dict, caption_examples: list[Example],
                     caption_targets: dict, llm, name_head_weights: dict, params: dict, cls_head: dict,
                     name_head: dict, seed: int, checkpoint_dir: str,
                     distributed: dict | None = None) -> tuple[dict, dict, object]:
    """Stage 1 for one variant, then on the decoupled CLS path its CLS head; returns its weights (projectors,
    codebooks and the name head, read frozen), a summary and the loss curve. `params`: pretrain.stage1 (loss
    weights, schedule, logging); `cls_head`: pretrain.cls_head (the decoupled head's own stage 1, losses and
    schedule); `name_head`: pretrain.name_head (whether stage 1's captions are read with the name tokens);
    `distributed`: the processes, strategy and precision stage 1 trains under (`distributed`).

    On the decoupled path with `cls_head.stage1: paper`, stage 1 is the shared path's, bit for bit: a
    training-only CLS codebook on `mm_projector` (`cls_head.stage1_cls_codes` codes) learns the paper's CLS
    terms and is dropped afterwards, so the LLM reads exactly the codes the paper's stage 1 gives it, whatever
    the head's K; `patch_only` drops the CLS terms."""
    config = QMLLMConfig.from_dict(qmllm_config)
    seed_everything(seed)
    paper_stage1 = config.quantized and config.cls_path == "decoupled" and cls_head["stage1"] == "paper"
    if cls_head["stage1"] not in STAGE1_WITH_HEAD:
        raise ValueError(f"pretrain.cls_head.stage1 must be one of {STAGE1_WITH_HEAD}, got {cls_head['stage1']!r}")
    stage1_config = paper_stage1_config(config, cls_head["stage1_cls_codes"]) if paper_stage1 else config
    model = _with_name_head(QMLLM(stage1_config, llm), name_head_weights)
    name_features = caption_features["head_cls"] if model.name_head is not None and name_head["in_stage1"] else None
    targets = None
    if model.quantized and not model.decoupled:
        targets = semantic_targets(caption_targets["targets"], params["standardize_semantic_target"])
    training = TrainingConfig(**params["training"])
    settings = DistributedSettings.from_params(distributed)
    checkpoint = TrainingCheckpoint(Path(checkpoint_dir) / f"{config.variant}_pretrain",
                                    {"config": stage1_config.to_dict(), "params": params, "seed": seed,
                                     "rows": len(caption_examples), **settings.checkpoint_fields()})
    step_logger = StepLogger(f"{config.variant}/pretrain", every=params["log_every"])
    started = time.perf_counter()
    pretrain(model, caption_features["cls"], caption_features["patches"], caption_examples, targets, training, seed,
             params["lambda_vq"], params["lambda_semantic"], params["usage_every"], step_logger, checkpoint,
             name_features, params["lambda_margin"], params["margin"], settings, params["gradient_checkpointing"])
    seconds = time.perf_counter() - started
    summary = {"variant": config.variant, "quantized": config.quantized, "seconds": round(seconds, 1),
               "steps": training.steps,
               "final": _final_losses(step_logger)}
    cls_features = caption_features["cls"]
    if paper_stage1:  # the deployed model: the stage-1 projector and patch codebook, a CLS head of its own
        model = with_stage1_patch_path(_with_name_head(QMLLM(config, llm), name_head_weights), model)
    if config.quantized and model.decoupled:
        cls_features = caption_features["head_cls"]
        summary["cls_head"] = _train_cls_head(model, cls_features, caption_targets["head_targets"], cls_head, seed,
                                              checkpoint_dir)
    if config.quantized:
        cls_index, patch_indices = code_indices(model, cls_features, caption_features["patches"])
        summary["codebooks"] = {"cls": model.cls_quantizer.usage_stats(cls_index),
                                "patch": model.patch_quantizer.usage_stats(patch_indices),
                                "cls_codes": config.cls_codes, "patch_codes": config.patch_codes,
                                "update": config.codebook_update}
    logger.info("pretrain %s: %.0f s, %s", config.variant, seconds, summary.get("codebooks", summary["final"]))
    curves = {k: v for k, v in step_logger.history.items() if k in ("generative", "vq_patch", "vq_cls", "semantic")}
    figure = loss_curve_figure(curves, f"stage 1 ({config.variant})")
    return model.stage1_state(), summary, figure


def _with_name_head(model: QMLLM, weights: dict) -> QMLLM:
    """`model` with the trained name head loaded (a model without one takes no weights)."""
    if model.name_head is None:
        if weights:
            raise ValueError("name head weights for a model without a name head (pretrain.name_head.slots)")
        return model
    model.name_head.load_state_dict(weights)
    return model


def _train_cls_head(model: QMLLM, cls_features: torch.Tensor, head_targets: torch.Tensor, params: dict, seed: int,
                    checkpoint_dir: str) -> dict:
    """The decoupled CLS path's own training (after stage 1, so it cannot touch what the LLM reads)."""
    training = TrainingConfig(**params["training"])
    targets = semantic_targets(head_targets, params["standardize_semantic_target"])
    checkpoint = TrainingCheckpoint(Path(checkpoint_dir) / f"{model.config.variant}_cls_head",
                                    {"config": model.config.to_dict(), "params": params, "seed": seed})
    step_logger = StepLogger(f"{model.config.variant}/cls_head", every=params["log_every"])
    started = time.perf_counter()
    train_cls_head(model, cls_features, targets, training, seed, params["lambda_vq"], params["lambda_semantic"],
                   params["usage_every"], step_logger, checkpoint)
    return {"seconds": round(time.perf_counter() - started, 1), "steps": training.steps,
            "batch_size": training.batch_size,
            "final": _final_losses(step_logger)}


def _final_losses(step_logger: StepLogger, window: int = 20) -> dict[str, float]:
    """Each logged series' mean over its last `window` points (the learning rate left out)."""
    return {k: float(np.mean([v for _, v in points[-window:]]))
            for k, points in step_logger.history.items() if points and k != "lr"}


def pretrain_report(qmllm_summary: dict, baseline_summary: dict, name_head_summary: dict) -> dict:
    """Codebook health and final losses of both variants and the name head's training: the pretrain metrics
    JSON, logged to MLflow."""
    report = {"qmllm": qmllm_summary, "baseline": baseline_summary, "name_head": name_head_summary}
    log_summary_metrics({k: {kk: vv for kk, vv in v.items() if kk != "variant"} for k, v in report.items()},
                        prefix="pretrain")
    return report
