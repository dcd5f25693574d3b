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
from qmllm_pipeline.models.qmllm import QMLLM, QMLLMConfig
from qmllm_pipeline.models.stages import (
    STAGE1_WITH_HEAD,
    Example,
    caption_examples,
    code_indices,
    paper_stage1_config,
    pretrain,
    train_cls_head,
    with_stage1_patch_path,
)
from qmllm_pipeline.models.training import TrainingConfig, loss_curve_figure, seed_everything
from qmllm_pipeline.tracking import StepLogger, log_summary_metrics

logger = logging.getLogger(__name__)


def model_config(tokenizer, llm, caption_features: dict, caption_targets: dict, model: dict, vision_tower: dict,
                 cls_head_features: dict, variant: dict) -> dict:
    """The variant's `QMLLMConfig`: the architecture in `pretrain.model`, the vision tower's settings
    (`features.vision_tower`; on the decoupled path the CLS source is `features.cls_head`'s), and the widths
    and `<image>` id of the models it sits between (the CLS feature's and the semantic target's widths size
    the CLS path)."""
    decoupled = variant["quantized"] and model.get("cls_path", "shared") == "decoupled"
    config = QMLLMConfig(
        vision_width=int(caption_features["patches"].shape[-1]), llm_width=llm.config.hidden_size,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), variant=variant["name"],
        quantized=variant["quantized"], mm_vision_select_layer=vision_tower["select_layer"],
        cls_source=cls_head_features["cls_source"] if decoupled else vision_tower["cls_source"],
        mm_patch_pool=vision_tower["patch_pool"], **model, **_cls_widths(caption_features, caption_targets, decoupled))
    return config.to_dict()


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
                     caption_targets: dict, llm, params: dict, cls_head: dict, seed: int,
                     checkpoint_dir: str) -> tuple[dict, dict, object]:
    """Stage 1 for one variant, then on the decoupled CLS path its CLS head; returns its weights (projectors
    and codebooks), a summary and the loss curve. `params`: pretrain.stage1 (loss weights, schedule,
    logging); `cls_head`: pretrain.cls_head (the decoupled head's own stage 1, losses and schedule).

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
    model = QMLLM(stage1_config, llm)
    targets = None
    if model.quantized and not model.decoupled:
        targets = semantic_targets(caption_targets["targets"], params["standardize_semantic_target"])
    training = TrainingConfig(**params["training"])
    checkpoint = TrainingCheckpoint(Path(checkpoint_dir) / f"{config.variant}_pretrain",
                                    {"config": stage1_config.to_dict(), "params": params, "seed": seed,
                                     "rows": len(caption_examples)})
    step_logger = StepLogger(f"{config.variant}/pretrain", every=params["log_every"])
    started = time.perf_counter()
    pretrain(model, caption_features["cls"], caption_features["patches"], caption_examples, targets, training, seed,
             params["lambda_vq"], params["lambda_semantic"], params["usage_every"], step_logger, checkpoint)
    seconds = time.perf_counter() - started
    summary = {"variant": config.variant, "quantized": config.quantized, "seconds": round(seconds, 1),
               "steps": training.steps,
               "final": _final_losses(step_logger)}
    cls_features = caption_features["cls"]
    if paper_stage1:  # the deployed model: the stage-1 projector and patch codebook, a CLS head of its own
        model = with_stage1_patch_path(QMLLM(config, llm), model)
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


def pretrain_report(qmllm_summary: dict, baseline_summary: dict) -> dict:
    """Codebook health and final losses of both variants: the pretrain metrics JSON, logged to MLflow."""
    report = {"qmllm": qmllm_summary, "baseline": baseline_summary}
    log_summary_metrics({k: {kk: vv for kk, vv in v.items() if kk != "variant"} for k, v in report.items()},
                        prefix="pretrain")
    return report
