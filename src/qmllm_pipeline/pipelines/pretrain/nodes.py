"""Nodes of the `pretrain` pipeline (stage 1), instantiated per variant (`qmllm`, `baseline`) by namespace."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from qmllm_pipeline.models.checkpoint import TrainingCheckpoint
from qmllm_pipeline.models.projector import build_mm_projector
from qmllm_pipeline.models.qmllm import QMLLM
from qmllm_pipeline.models.quantizer import VectorQuantizer
from qmllm_pipeline.models.stages import code_indices, pretrain
from qmllm_pipeline.models.tokenizer import IMAGE_TOKEN, encode_chat
from qmllm_pipeline.models.training import loss_curve_figure, seed_and_threads
from qmllm_pipeline.tracking import StepLogger, log_summary_metrics

logger = logging.getLogger(__name__)


def build_qmllm(llm, tokenizer, params: dict, quantized: bool, vision_width: int) -> QMLLM:
    """The Q-MLLM (or, unquantized, the continuous baseline) around a frozen LLM, from stage-1 parameters."""
    llm_width = llm.config.hidden_size
    projector = build_mm_projector(params["projector"]["type"], vision_width, llm_width,
                                   params["projector"]["layernorm"])
    quantizers = {}
    if quantized:
        codebooks = params["codebooks"]
        common = {"commitment": codebooks["commitment"], "update": codebooks["update"], "decay": codebooks["decay"],
                  "dead_code_threshold": codebooks["dead_code_threshold"], "kmeans_iters": codebooks["kmeans_iters"]}
        quantizers = {"cls_quantizer": VectorQuantizer(codebooks["cls_codes"], llm_width, **common),
                      "patch_quantizer": VectorQuantizer(codebooks["patch_codes"], llm_width, **common)}
    return QMLLM(projector, llm, tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), **quantizers)


def stage1_state(model: QMLLM) -> dict[str, torch.Tensor]:
    """Everything stage 1 trains, as one flat dict: mm_projector.*, cls_quantizer.*, patch_quantizer.*."""
    state = {f"mm_projector.{k}": v for k, v in model.mm_projector.state_dict().items()}
    for name in ("cls_quantizer", "patch_quantizer"):
        module = getattr(model, name)
        if module is not None:
            state.update({f"{name}.{k}": v for k, v in module.state_dict().items()})
    return state


def load_stage1_state(model: QMLLM, state: dict[str, torch.Tensor]) -> QMLLM:
    for name in ("mm_projector", "cls_quantizer", "patch_quantizer"):
        module = getattr(model, name)
        part = {k.split(".", 1)[1]: v for k, v in state.items() if k.startswith(f"{name}.")}
        if module is not None:
            module.load_state_dict(part)
        elif part:
            raise ValueError(f"stage-1 weights contain {name} but the model has none (variant mismatch?)")
    return model.eval()


def caption_examples(caption_corpus: pd.DataFrame, tokenizer, instruction: str, max_length: int):
    """(ids, labels, feature row) per corpus row: `<image>\\n{instruction}` -> caption, loss on the caption."""
    encoded = {}
    examples = []
    for row, text in enumerate(caption_corpus["caption"]):
        if text not in encoded:
            messages = [{"role": "user", "content": f"{IMAGE_TOKEN}\n{instruction}"},
                        {"role": "assistant", "content": text}]
            encoded[text] = encode_chat(tokenizer, messages, max_length)
        ids, labels = encoded[text]
        examples.append((ids, labels, row))
    return examples


def semantic_targets(targets: dict[str, torch.Tensor], standardize: bool) -> torch.Tensor:
    """L_semantic's target, optionally standardised per dimension (spreads the CLS codes; see DESIGN.md)."""
    values = targets["targets"].float()
    if standardize:
        values = (values - values.mean(0)) / values.std(0).clamp(min=1e-6)
    return values


def pretrain_variant(caption_features: dict, caption_targets: dict, caption_corpus: pd.DataFrame, tokenizer, llm,
                     params: dict, variant: dict) -> tuple[dict, dict, object]:
    """Stage 1 for one variant; returns its weights (projector and codebooks), a summary and the loss curve."""
    name, quantized = variant["name"], variant["quantized"]
    seed_and_threads(params["seed"], params["threads"])
    model = build_qmllm(llm, tokenizer, params, quantized, caption_features["cls"].shape[-1])
    examples = caption_examples(caption_corpus, tokenizer, params["caption_instruction"], params["max_length"])
    targets = semantic_targets(caption_targets, params["semantic_target"]["standardize"]) if quantized else None
    training = params["training"]
    checkpoint = TrainingCheckpoint(Path(params["checkpoint_dir"]) / f"{name}_pretrain",
                                    {"variant": variant, "params": params, "rows": len(examples)})
    step_logger = StepLogger(f"{name}/pretrain", every=params["log_every"])
    started = time.perf_counter()
    pretrain(model, caption_features["cls"], caption_features["patches"], examples, targets, training,
             params["seed"], params["threads"], step_logger, checkpoint)
    seconds = time.perf_counter() - started
    summary = {"variant": name, "quantized": quantized, "seconds": round(seconds, 1), "steps": training["steps"],
               "final": {k: float(np.mean([v for _, v in points[-20:]]))
                         for k, points in step_logger.history.items() if points and k != "lr"}}
    if quantized:
        cls_index, patch_indices = code_indices(model, caption_features["cls"], caption_features["patches"])
        summary["codebooks"] = {"cls": model.cls_quantizer.usage_stats(cls_index),
                                "patch": model.patch_quantizer.usage_stats(patch_indices),
                                "cls_codes": model.cls_quantizer.num_codes,
                                "patch_codes": model.patch_quantizer.num_codes,
                                "update": params["codebooks"]["update"]}
    logger.info("pretrain %s: %.0f s, %s", name, seconds, summary.get("codebooks", summary["final"]))
    curves = {k: v for k, v in step_logger.history.items() if k in ("generative", "vq_patch", "vq_cls", "semantic")}
    figure = loss_curve_figure(curves, f"stage 1 ({name})")
    return stage1_state(model), summary, figure


def pretrain_report(qmllm_summary: dict, baseline_summary: dict) -> dict:
    """Codebook health and final losses of both variants: the pretrain metrics JSON, logged to MLflow."""
    report = {"qmllm": qmllm_summary, "baseline": baseline_summary}
    log_summary_metrics({k: {kk: vv for kk, vv in v.items() if kk != "variant"} for k, v in report.items()},
                        prefix="pretrain")
    return report
