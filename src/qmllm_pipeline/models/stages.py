"""Q-MLLM's two training stages, on cached vision features.

Stage 1 (pretrain): vision tower and LLM frozen; train `mm_projector`, `cls_quantizer`, `patch_quantizer`:
    L_pretrain = L_generative + lambda_vq (L_vq_patch + L_vq_cls) + lambda_semantic L_semantic
The continuous baseline trains its projector with L_generative alone.

Stage 2 (finetune): projector and codebooks frozen; the LLM learns from dialogs with the LM loss on the
assistant's tokens only, mixed with text-only replay so that its safety behaviour survives.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from qmllm_pipeline.constants import IMAGE_TOKEN
from qmllm_pipeline.models.checkpoint import TrainingCheckpoint
from qmllm_pipeline.models.qmllm import QMLLM
from qmllm_pipeline.models.tokenizer import encode_chat
from qmllm_pipeline.models.training import TrainingConfig, train_loop
from qmllm_pipeline.tracking import StepLogger

Example = tuple[list[int], list[int], int]  # token ids, labels, feature row (-1: no image)


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
        ids, labels = encoded[text]
        examples.append((ids, labels, row))
    return examples


def stage1_losses(model: QMLLM, cls_features: torch.Tensor, patch_features: torch.Tensor,
                  examples: list[Example], semantic_targets: torch.Tensor | None = None, lambda_vq: float = 1.0,
                  lambda_semantic: float = 0.0) -> dict[str, torch.Tensor]:
    """One stage-1 batch: the examples' caption loss given their (cached) image features, plus for Q-MLLM
    both VQ losses and L_semantic against the targets of the same feature rows. `loss` is the total."""
    rows = torch.tensor([example[2] for example in examples])
    encoding = model.encode_features(cls_features[rows].float(), patch_features[rows].float())
    generative = model([e[0] for e in examples], [e[1] for e in examples], encoding.image_tokens).loss
    losses = {"generative": generative}
    total = generative
    if model.quantized:
        losses.update(vq_patch=encoding.patches.loss, vq_cls=encoding.cls.loss)
        total = total + lambda_vq * (encoding.patches.loss + encoding.cls.loss)
        if semantic_targets is not None and lambda_semantic > 0:
            semantic = F.mse_loss(encoding.cls.quantized, semantic_targets[rows].float())
            losses["semantic"] = semantic
            total = total + lambda_semantic * semantic
        losses["cls_indices"], losses["patch_indices"] = encoding.cls.indices, encoding.patches.indices
    losses["loss"] = total
    return losses


def pretrain(model: QMLLM, cls_features: torch.Tensor, patch_features: torch.Tensor, examples: list[Example],
             semantic_targets: torch.Tensor | None, training: TrainingConfig, seed: int, lambda_vq: float = 1.0,
             lambda_semantic: float = 1.0, usage_every: int = 100, step_logger: StepLogger | None = None,
             checkpoint: TrainingCheckpoint | None = None) -> QMLLM:
    """Stage 1 on (image features, caption) pairs; `examples[i]` uses feature row `examples[i][2]`. Every
    `usage_every` steps the codebooks' usage and perplexity over those steps are logged."""
    model.llm.requires_grad_(False)
    trainable = {"mm_projector": model.mm_projector}
    if model.quantized:
        trainable.update(cls_quantizer=model.cls_quantizer, patch_quantizer=model.patch_quantizer)
    seen = {"cls": [], "patch": []}
    steps_done = [0]

    def step(generator: torch.Generator) -> dict[str, torch.Tensor]:
        picks = torch.randint(len(examples), (training.batch_size,), generator=generator).tolist()
        losses = stage1_losses(model, cls_features, patch_features, [examples[i] for i in picks],
                               semantic_targets, lambda_vq, lambda_semantic)
        if model.quantized:
            seen["cls"].append(losses.pop("cls_indices").flatten())
            seen["patch"].append(losses.pop("patch_indices").flatten())
        steps_done[0] += 1
        if model.quantized and steps_done[0] % usage_every == 0:  # codebook health over the last steps
            for name, quantizer in (("cls", model.cls_quantizer), ("patch", model.patch_quantizer)):
                stats = quantizer.usage_stats(torch.cat(seen[name]))
                losses[f"{name}_codes_used"] = torch.tensor(float(stats["codes_used"]))
                losses[f"{name}_perplexity"] = torch.tensor(stats["perplexity"])
                seen[name].clear()
        losses["loss"] = losses.pop("loss")  # the total last, as logged before
        return losses

    train_loop(trainable, step, training, seed, step_logger, checkpoint,
               desc=f"pretrain {model.config.variant}")
    return model


def finetune(model: QMLLM, cls_features: torch.Tensor, patch_features: torch.Tensor, examples: list[Example],
             training: TrainingConfig, seed: int, step_logger: StepLogger | None = None,
             checkpoint: TrainingCheckpoint | None = None) -> QMLLM:
    """Stage 2: train the LLM on dialogs (image rows >= 0) and text-only replay (row -1)."""
    for frozen in (model.mm_projector, model.cls_quantizer, model.patch_quantizer):
        if frozen is not None:
            frozen.requires_grad_(False).eval()
    model.llm.requires_grad_(True)

    def step(generator: torch.Generator) -> dict[str, torch.Tensor]:
        picks = torch.randint(len(examples), (training.batch_size,), generator=generator).tolist()
        rows = [examples[i][2] for i in picks if examples[i][2] >= 0]
        image_tokens = None
        if rows:
            with torch.no_grad():
                image_tokens = model.encode_features(cls_features[rows].float(),
                                                     patch_features[rows].float()).image_tokens
        loss = model([examples[i][0] for i in picks], [examples[i][1] for i in picks], image_tokens).loss
        return {"loss": loss}

    train_loop({"llm": model.llm}, step, training, seed, step_logger, checkpoint,
               desc=f"finetune {model.config.variant}")
    return model


@torch.no_grad()
def code_indices(model: QMLLM, cls_features: torch.Tensor, patch_features: torch.Tensor,
                 batch_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """cls_index (N,) and patch_indices (N, P) for cached features, in eval mode (no codebook updates)."""
    model.eval()
    cls_out, patch_out = [], []
    for start in range(0, len(cls_features), batch_size):
        encoding = model.encode_features(cls_features[start:start + batch_size].float(),
                                         patch_features[start:start + batch_size].float())
        cls_out.append(encoding.cls.indices)
        patch_out.append(encoding.patches.indices)
    return torch.cat(cls_out), torch.cat(patch_out)
