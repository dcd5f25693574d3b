"""The two heads beyond the paper, each trained on cached features with no LLM in the loop (so a step costs
about a millisecond and they afford far more samples than stage 1):

- the decoupled CLS head (`QMLLMConfig.cls_path: decoupled`): `cls_projector` and `cls_quantizer`, trained
  after stage 1 on L_cls = lambda_vq L_vq_cls + lambda_semantic L_semantic, so nothing the LLM reads
  depends on the CLS settings; the safety map reads its codes.
- the name head (`models/names.py`): names up to `slots` objects from the catalogue, trained before stage 1
  (cross-entropy per slot); both stages then read it frozen, as they read the vision tower.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from qmllm_pipeline.models.checkpoint import TrainingCheckpoint
from qmllm_pipeline.models.names import NameHead, name_head_losses
from qmllm_pipeline.models.qmllm import QMLLM
from qmllm_pipeline.models.stage1 import semantic_targets
from qmllm_pipeline.models.training import TrainingConfig, train_loop
from qmllm_pipeline.tracking import StepLogger


@dataclass(frozen=True)
class ClsHeadSettings:
    """`pretrain.cls_head`: the decoupled CLS path's stage 1 (`paper`: stage 1 keeps the paper's CLS terms on a
    training-only codebook of `stage1_cls_codes`; `patch_only`: it drops them), its own losses and schedule."""
    training: TrainingConfig
    stage1: Literal["paper", "patch_only"] = "paper"
    stage1_cls_codes: int = 128
    standardize_semantic_target: bool = True
    lambda_vq: float = 1.0
    lambda_semantic: float = 1.0
    usage_every: int = 100
    log_every: int = 50


@dataclass(frozen=True)
class NameHeadSettings:
    """`pretrain.name_head`: its shape (`slots` objects, a `background` pick, a `count` pick, what it reads),
    where the LLM reads its tokens (`position`), whether stage 1 reads them (`in_stage1`), and its schedule.
    `slots: 0` is no name head (the paper's model)."""
    training: TrainingConfig
    slots: int = 3
    background: bool = True
    count: bool = True
    position: Literal["before", "after"] = "before"
    in_stage1: bool = True
    inputs: Literal["cls", "cls_mean_patch", "cls_patches"] = "cls_patches"
    hidden: int = 512
    patch_dim: int = 32
    dropout: float = 0.1
    log_every: int = 50


def cls_head_losses(model: QMLLM, cls_features: torch.Tensor, semantic_targets: torch.Tensor,
                    lambda_vq: float = 1.0, lambda_semantic: float = 1.0) -> dict[str, torch.Tensor]:
    """One batch of the decoupled CLS head: L_vq_cls and L_semantic (MSE from the code to the target, on the
    unit sphere for the cosine distance); `loss` is the total."""
    encoding = model.cls_quantizer(model.cls_head(cls_features.float().to(model.device)))
    targets = semantic_targets.float().to(model.device)
    if model.config.cls_distance == "cosine":
        targets = F.normalize(targets, dim=-1)
    semantic = F.mse_loss(encoding.quantized, targets)
    return {"vq_cls": encoding.loss, "semantic": semantic, "cls_indices": encoding.indices,
            "loss": lambda_vq * encoding.loss + lambda_semantic * semantic}


def train_cls_head(model: QMLLM, cls_features: torch.Tensor, targets: torch.Tensor, settings: ClsHeadSettings,
                   seed: int, step_logger: StepLogger | None = None,
                   checkpoint: TrainingCheckpoint | None = None) -> QMLLM:
    """The decoupled CLS path: `cls_projector` and `cls_quantizer` on cached CLS features and their raw
    semantic targets (row i with row i; standardised when the settings say so), nothing else in the loop;
    everything the LLM reads stays as it is."""
    if not model.decoupled:
        raise ValueError("train_cls_head trains the decoupled CLS path; this model shares mm_projector")
    targets = semantic_targets(targets, settings.standardize_semantic_target)
    seen = []

    def step(generator: torch.Generator) -> dict[str, torch.Tensor]:
        rows = torch.randint(len(cls_features), (settings.training.batch_size,), generator=generator)
        losses = cls_head_losses(model, cls_features[rows], targets[rows], settings.lambda_vq,
                                 settings.lambda_semantic)
        seen.append(losses.pop("cls_indices"))
        if len(seen) == settings.usage_every:
            stats = model.cls_quantizer.usage_stats(torch.cat(seen).cpu())
            losses["cls_codes_used"] = torch.tensor(float(stats["codes_used"]))
            losses["cls_perplexity"] = torch.tensor(stats["perplexity"])
            seen.clear()
        losses["loss"] = losses.pop("loss")
        return losses

    train_loop({"cls_projector": model.cls_projector, "cls_quantizer": model.cls_quantizer}, step,
               settings.training, seed, step_logger, checkpoint, desc=f"CLS head {model.config.variant}")
    return model


def train_name_head(head: NameHead, cls_features: torch.Tensor, patch_features: torch.Tensor,
                    targets: torch.Tensor, training: TrainingConfig, seed: int,
                    step_logger: StepLogger | None = None, checkpoint: TrainingCheckpoint | None = None) -> NameHead:
    """The name head on cached features (row i with row i): `targets` (rows, slots) are each scene's objects in
    reading order as vocabulary indices, then the empty entry (`names.slot_targets`)."""
    def step(generator: torch.Generator) -> dict[str, torch.Tensor]:
        rows = torch.randint(len(cls_features), (training.batch_size,), generator=generator)
        return name_head_losses(head, cls_features[rows], patch_features[rows], targets[rows])

    train_loop({"name_head": head}, step, training, seed, step_logger, checkpoint, desc="name head")
    return head
