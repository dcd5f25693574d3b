"""Stage 1 (pretrain) on cached vision features: vision tower and LLM frozen; train `mm_projector` and, for
Q-MLLM, `cls_quantizer` and `patch_quantizer` (docs/method.md, "Training"):

    L_pretrain = L_generative + lambda_vq (L_vq_patch + L_vq_cls) + lambda_semantic L_semantic
                 [+ lambda_margin L_margin, beyond the paper, off by default]

L_margin = mean over patch features of relu(margin * s - flip_distance(h)), s the codebook's half spacing:
it pushes each projected patch feature away from the faces of its code's Voronoi cell, so that a small
perturbation of the image leaves its code, and what the LLM reads, as it is. The continuous baseline trains
its projector with L_generative alone.

On the decoupled CLS path (`QMLLMConfig.cls_path`), stage 1 either stays the paper's (`paper_stage1_config`:
a CLS codebook on `mm_projector` trains with the paper's CLS terms and is then dropped, so the LLM reads the
shared path's codes bit for bit) or drops the two CLS terms (`patch_only`); the CLS head itself trains
afterwards (`models/heads.py`). A name head, if the model has one, is read frozen.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from qmllm_pipeline.constants import IGNORE_INDEX, IMAGE_TOKEN
from qmllm_pipeline.models.checkpoint import TrainingCheckpoint
from qmllm_pipeline.models.distributed import DistributedSettings, rank_share
from qmllm_pipeline.models.feature_shards import gather, modules_of
from qmllm_pipeline.models.qmllm import QMLLM, QMLLMConfig
from qmllm_pipeline.models.tokenizer import encode_chat
from qmllm_pipeline.models.training import TrainingConfig, activation_checkpointing, train_loop
from qmllm_pipeline.tracking import StepLogger

Example = tuple[list[int], list[int], int]  # token ids, labels, feature row (-1: no image)


@dataclass(frozen=True)
class Stage1Settings:
    """`pretrain.stage1`: the loss weights, how often codebook health is reported and losses logged, and the
    schedule. `gradient_checkpointing`: the frozen LLM recomputes its activations in the backward pass
    (memory for time; the gradient reaching the projector is the same)."""
    training: TrainingConfig
    standardize_semantic_target: bool = True
    lambda_vq: float = 1.0
    lambda_semantic: float = 1.0
    lambda_margin: float = 0.0
    margin: float = 0.5
    usage_every: int = 100
    log_every: int = 25
    gradient_checkpointing: bool = False


@dataclass(frozen=True)
class Stage1Data:
    """Stage 1's training set, row i with row i: the cached CLIP features of each caption-corpus image, their
    L_semantic targets (raw), and the tokenised captions (`examples[k]` reads feature row `examples[k][2]`).
    `head_cls` / `head_targets`: what a decoupled CLS head and the name head read and aim for."""
    cls: torch.Tensor
    patches: torch.Tensor
    examples: list[Example]
    head_cls: torch.Tensor | None = None
    targets: torch.Tensor | None = None
    head_targets: torch.Tensor | None = None

    @classmethod
    def from_cache(cls, features: dict, targets: dict, examples: list[Example]) -> Stage1Data:
        """From the `features` pipeline's caches (`cls`, `patches`, `head_cls`; `targets`, `head_targets`): tensors,
        shards on disk (`ShardedFeatures`, read a batch at a time) or lazy shards (computed and gathered here)."""
        features = gather(features)
        return cls(features["cls"], features["patches"], examples, features.get("head_cls"), targets.get("targets"),
                   targets.get("head_targets"))


def paper_stage1_config(config: QMLLMConfig, cls_codes: int) -> QMLLMConfig:
    """The shared-path config a decoupled model's stage 1 trains under when it keeps the paper's CLS terms:
    the same projector and patch codebook, a CLS codebook of `cls_codes` on `mm_projector` (L2, the LLM's
    width). That codebook is a training-only regulariser, so its size is a stage-1 setting, not the head's
    K; `with_stage1_patch_path` keeps the rest."""
    return dataclasses.replace(config, cls_path="shared", cls_vision_width=None, cls_width=None, cls_distance="l2",
                               cls_codes=cls_codes)


def with_stage1_patch_path(model: QMLLM, stage1_model: QMLLM) -> QMLLM:
    """`model` (decoupled, its CLS head untrained) with the trained `mm_projector` and `patch_quantizer` of
    `stage1_model`: everything the LLM reads."""
    model.mm_projector.load_state_dict(stage1_model.mm_projector.state_dict())
    model.patch_quantizer.load_state_dict(stage1_model.patch_quantizer.state_dict())
    return model


def caption_examples(captions: list[str], tokenizer, instruction: str, max_length: int) -> list[Example]:
    """(ids, labels, feature row) per caption: `<image>\\n{instruction}` -> caption, loss on the caption only.
    Row i uses feature row i; repeated captions are encoded once."""
    encoded = {}
    examples = []
    for row, text in enumerate(captions):
        if text not in encoded:
            messages = [{"role": "user", "content": f"{IMAGE_TOKEN}\n{instruction}"},
                        {"role": "assistant", "content": text}]
            encoded[text] = encode_chat(tokenizer, messages, max_length)
            if all(label == IGNORE_INDEX for label in encoded[text][1]):
                raise ValueError(f"caption row {row}: no caption token within max_length {max_length} (the prompt "
                                 "alone is longer; a real LLM's conversation format needs more: pretrain.max_length)")
        ids, labels = encoded[text]
        examples.append((ids, labels, row))
    return examples


def semantic_targets(targets: torch.Tensor, standardize: bool) -> torch.Tensor:
    """L_semantic's target, optionally standardised per dimension (spreads the CLS codes; docs/method.md)."""
    values = targets.float()
    if standardize:
        values = (values - values.mean(0)) / values.std(0).clamp(min=1e-6)
    return values


def stage1_losses(model: QMLLM, data: Stage1Data, examples: list[Example], semantic: torch.Tensor | None = None,
                  names: bool = False, lambda_vq: float = 1.0, lambda_semantic: float = 0.0,
                  lambda_margin: float = 0.0, margin: float = 0.5) -> dict[str, torch.Tensor]:
    """One stage-1 batch: the examples' caption loss given their cached image features, plus for Q-MLLM both
    VQ losses and L_semantic against `semantic` (the targets by row, None: no L_semantic), and with
    `lambda_margin` > 0 the patch margin term (`margin`: the flip distance asked for, as a share of the
    codebook's half spacing; the mean flip distance is reported either way, as `patch_flip_distance`).
    `names`: the captions are read with the name head's tokens (its CLS feature `data.head_cls`). `loss` is
    the total."""
    rows = torch.tensor([example[2] for example in examples])
    device = next(model.mm_projector.parameters()).device
    encoding = model.encode_features(data.cls[rows].float().to(device), data.patches[rows].float().to(device),
                                     with_cls=not model.decoupled,
                                     name_features=data.head_cls[rows].float().to(device) if names else None,
                                     with_names=names)
    generative = model([e[0] for e in examples], [e[1] for e in examples], encoding.image_tokens).loss
    losses = {"generative": generative}
    total = generative
    if model.quantized:
        flips = model.patch_quantizer.flip_distance(encoding.patch_hidden, relative=True)
        losses["patch_flip_distance"] = flips.detach().mean()
        if lambda_margin > 0:
            losses["margin"] = F.relu(margin - flips).mean()
            total = total + lambda_margin * losses["margin"]
    if model.quantized and encoding.cls is None:  # decoupled: the CLS head trains apart
        losses["vq_patch"] = encoding.patches.loss
        total = total + lambda_vq * encoding.patches.loss
        losses["patch_indices"] = encoding.patches.indices
    elif model.quantized:
        losses.update(vq_patch=encoding.patches.loss, vq_cls=encoding.cls.loss)
        total = total + lambda_vq * (encoding.patches.loss + encoding.cls.loss)
        if semantic is not None and lambda_semantic > 0:
            losses["semantic"] = F.mse_loss(encoding.cls.quantized, semantic[rows].float().to(device))
            total = total + lambda_semantic * losses["semantic"]
        losses["cls_indices"], losses["patch_indices"] = encoding.cls.indices, encoding.patches.indices
    losses["loss"] = total
    return losses


class CodebookUsage:
    """Codebook health every `every` steps: each quantizer's codes used and perplexity over the codes it
    assigned since the last report (popped from a step's losses, added back as the report)."""

    def __init__(self, quantizers: dict, every: int):
        self.quantizers, self.every = quantizers, every
        self.seen = {name: [] for name in quantizers}
        self.steps = 0

    def update(self, losses: dict[str, torch.Tensor]) -> None:
        for name in self.quantizers:
            self.seen[name].append(losses.pop(f"{name}_indices").flatten())
        self.steps += 1
        if self.quantizers and self.steps % self.every == 0:
            for name, quantizer in self.quantizers.items():
                stats = quantizer.usage_stats(torch.cat(self.seen[name]))
                losses[f"{name}_codes_used"] = torch.tensor(float(stats["codes_used"]))
                losses[f"{name}_perplexity"] = torch.tensor(stats["perplexity"])
                self.seen[name].clear()


def train_stage1(model: QMLLM, data: Stage1Data, settings: Stage1Settings, seed: int, names: bool = False,
                 step_logger: StepLogger | None = None, checkpoint: TrainingCheckpoint | None = None,
                 distributed: DistributedSettings | None = None) -> QMLLM:
    """Stage 1 on (image features, caption) pairs. L_semantic (the shared CLS path only) reads `data.targets`,
    standardised when the settings say so. A name head, if the model has one, is read frozen when `names`
    (its tokens beside the patch tokens), else not at all. `distributed`: the processes and strategy the loop
    runs under (None: plain PyTorch, one process)."""
    model.llm.requires_grad_(False)
    if model.name_head is not None:
        model.name_head.requires_grad_(False).eval()
    names = names and model.name_head is not None
    semantic = None
    if model.quantized and not model.decoupled and data.targets is not None:
        semantic = semantic_targets(data.targets, settings.standardize_semantic_target)
    trainable = {"mm_projector": model.mm_projector}
    quantizers = {}
    if model.quantized:
        quantizers = {"patch": model.patch_quantizer} if model.decoupled else {"cls": model.cls_quantizer,
                                                                               "patch": model.patch_quantizer}
        trainable.update({f"{name}_quantizer": quantizer for name, quantizer in quantizers.items()})
    usage = CodebookUsage(quantizers, settings.usage_every)

    def step(generator: torch.Generator) -> dict[str, torch.Tensor]:
        picks = torch.randint(len(data.examples), (settings.training.batch_size,), generator=generator).tolist()
        picks, _ = rank_share(picks, generator)  # this process's share (all of it with one process)
        losses = stage1_losses(model, data, [data.examples[i] for i in picks], semantic, names, settings.lambda_vq,
                               settings.lambda_semantic, settings.lambda_margin, settings.margin)
        usage.update(losses)
        losses["loss"] = losses.pop("loss")  # the total last, as logged before
        return losses

    if settings.gradient_checkpointing:  # transformers checkpoints only in training mode
        activation_checkpointing(model.llm, True)
        model.llm.train()
    train_loop(trainable, step, settings.training, seed, step_logger, checkpoint,
               desc=f"pretrain {model.config.variant}", distributed=distributed,
               carry=(model, *modules_of(data.cls, data.head_cls, data.patches)))
    if settings.gradient_checkpointing:
        activation_checkpointing(model.llm, False)
        model.llm.eval()
    return model


@torch.no_grad()
def code_indices(model: QMLLM, cls_features: torch.Tensor, patch_features: torch.Tensor,
                 batch_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """cls_index (N,) and patch_indices (N, P) for cached features, in eval mode (no codebook updates)."""
    model.eval()
    cls_out, patch_out = [], []
    for start in range(0, len(cls_features), batch_size):
        encoding = model.encode_features(cls_features[start:start + batch_size].float(),
                                         patch_features[start:start + batch_size].float(), with_names=False)
        cls_out.append(encoding.cls.indices)
        patch_out.append(encoding.patches.indices)
    return torch.cat(cls_out), torch.cat(patch_out)

