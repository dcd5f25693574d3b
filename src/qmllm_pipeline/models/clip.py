"""A tiny transformers `CLIPModel` for the embedded world: config, contrastive training, zero-shot use.

Its vision tower plays F_v (the frozen encoder) for Q-MLLM; its text tower serves the SafeCLIP-style
filter. Real weights (CLIP ViT-L/14-336) load through the same `CLIPModel` class.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

from qmllm_pipeline.models.training import TrainingConfig, train_loop
from qmllm_pipeline.tracking import StepLogger


@dataclass(frozen=True)
class TowerShape:
    """One transformer tower of the tiny CLIP."""
    hidden_size: int
    intermediate_size: int
    layers: int
    heads: int


def build_clip(tokenizer, image_size: int, patch_size: int, vision: TowerShape, text: TowerShape,
               max_text_tokens: int, projection_dim: int) -> CLIPModel:
    """A freshly initialised CLIPModel over `tokenizer`'s vocabulary (its EOS must not be id 2)."""
    config = CLIPConfig(
        text_config={
            "vocab_size": len(tokenizer), "hidden_size": text.hidden_size,
            "intermediate_size": text.intermediate_size, "num_hidden_layers": text.layers,
            "num_attention_heads": text.heads, "max_position_embeddings": max_text_tokens,
            "pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
        },
        vision_config={
            "image_size": image_size, "patch_size": patch_size, "hidden_size": vision.hidden_size,
            "intermediate_size": vision.intermediate_size, "num_hidden_layers": vision.layers,
            "num_attention_heads": vision.heads,
        },
        projection_dim=projection_dim,
    )
    if config.text_config.eos_token_id == 2:  # see models/tokenizer.py: id 2 selects CLIP's legacy pooling
        raise ValueError("CLIP text eos_token_id must not be 2 (legacy argmax pooling)")
    return CLIPModel(config)


def build_image_processor(image_size: int, image_mean: list[float], image_std: list[float]) -> CLIPImageProcessor:
    return CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
                              image_mean=image_mean, image_std=image_std)


def decode_images(pngs, desc: str | None = "decode images") -> torch.Tensor:
    """PNG bytes -> uint8 tensor (N, 3, H, W), decoded once and kept compact in memory (no progress bar
    when `desc` is None)."""
    arrays = [np.asarray(Image.open(io.BytesIO(b)).convert("RGB"))
              for b in tqdm(pngs, desc=desc, mininterval=2, disable=desc is None)]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def png_pixel_values(pngs, processor: CLIPImageProcessor) -> torch.Tensor:
    """PNG bytes -> normalised float pixels. Images at the processor's crop size (the emoji world's) are
    only rescaled and normalised, as the processor does; any other size (real data) goes through the
    processor itself (resize, centre crop)."""
    images = [Image.open(io.BytesIO(b)).convert("RGB") for b in pngs]
    crop = processor.crop_size
    if all(image.size == (crop["width"], crop["height"]) for image in images):
        arrays = torch.from_numpy(np.stack([np.asarray(image) for image in images])).permute(0, 3, 1, 2)
        return normalise_pixels(arrays.float() / 255.0, processor)
    return processor(images=images, return_tensors="pt")["pixel_values"]


def pixel_values(images: torch.Tensor, processor: CLIPImageProcessor) -> torch.Tensor:
    """uint8 (N, 3, H, W) at the processor's crop size -> normalised float pixels, as the processor does
    (rescale by 1/255, then mean/std). Images of another size go through the processor itself."""
    crop = processor.crop_size
    if tuple(images.shape[-2:]) != (crop["height"], crop["width"]):
        pil = [Image.fromarray(i.permute(1, 2, 0).numpy()) for i in images]
        return processor(images=pil, return_tensors="pt")["pixel_values"]
    return normalise_pixels(images.float() / 255.0, processor)


def normalise_pixels(images: torch.Tensor, processor: CLIPImageProcessor) -> torch.Tensor:
    """Float images in [0, 1] (N, 3, H, W) -> CLIP's normalised pixels, differentiably (attacks work in [0, 1])."""
    mean = torch.tensor(processor.image_mean, dtype=images.dtype).view(1, 3, 1, 1)
    std = torch.tensor(processor.image_std, dtype=images.dtype).view(1, 3, 1, 1)
    return (images - mean) / std


def tokenize_captions(tokenizer, captions: list[str], max_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Caption ids with EOS appended (CLIP pools the text at its first EOS), right-padded."""
    encoded = [tokenizer(c, add_special_tokens=False)["input_ids"][: max_tokens - 1] + [tokenizer.eos_token_id]
               for c in captions]
    longest = max(len(e) for e in encoded)
    ids = torch.full((len(encoded), longest), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(encoded), longest), dtype=torch.long)
    for row, e in enumerate(encoded):
        ids[row, : len(e)] = torch.tensor(e)
        mask[row, : len(e)] = 1
    return ids, mask


def train_clip(model: CLIPModel, processor, tokenizer, images: torch.Tensor, captions: list[str],
               training: TrainingConfig, seed: int, max_text_tokens: int, step_logger: StepLogger | None = None,
               groups: np.ndarray | None = None, same_group_fraction: float = 0.0) -> CLIPModel:
    """Contrastive training on (image, caption) pairs; returns the model in eval mode.

    With `groups` (e.g. each scene's background colour), a share `same_group_fraction` of the batches is
    drawn from one group only, to take away the shortcut of telling captions apart by background (hard
    negatives).
    """
    unique_captions, caption_index = np.unique(np.asarray(captions), return_inverse=True)
    caption_index = torch.from_numpy(caption_index)
    text_ids, text_mask = tokenize_captions(tokenizer, list(unique_captions), max_text_tokens)
    members = None
    if groups is not None:
        members = [torch.from_numpy(np.flatnonzero(groups == g)) for g in np.unique(groups)]

    def step(generator: torch.Generator) -> dict[str, torch.Tensor]:
        batch = _sample_batch(len(images), training.batch_size, generator, members, same_group_fraction)
        rows = caption_index[batch]
        width = int(text_mask[rows].sum(dim=1).max())
        # CLIP's own symmetric InfoNCE. Repeated captions in a batch need no special case: their text
        # embeddings are identical, so marking them as extra positives gives exactly the same loss.
        loss = model(input_ids=text_ids[rows, :width], attention_mask=text_mask[rows, :width],
                     pixel_values=pixel_values(images[batch], processor), return_loss=True).loss
        return {"loss": loss}

    train_loop({"clip": model}, step, training, seed, step_logger, desc="train CLIP")
    return model


def _sample_batch(n: int, size: int, generator: torch.Generator, members: list[torch.Tensor] | None,
                  same_group_fraction: float) -> torch.Tensor:
    one_group = same_group_fraction > 0 and torch.rand(1, generator=generator).item() < same_group_fraction
    if members is not None and one_group:
        group = members[int(torch.randint(len(members), (1,), generator=generator))]
        return group[torch.randint(len(group), (size,), generator=generator)]
    return torch.randint(n, (size,), generator=generator)


@torch.no_grad()
def image_embeddings(model: CLIPModel, processor, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """CLIP's normalised image embedding of each uint8 image (N, 3, H, W), on the model's device."""
    device = model.logit_scale.device
    chunks = [model.get_image_features(pixel_values=pixel_values(images[i:i + batch_size], processor).to(device)
                                       ).pooler_output for i in range(0, len(images), batch_size)]
    return F.normalize(torch.cat(chunks), dim=-1)


@torch.no_grad()
def text_embeddings(model: CLIPModel, tokenizer, texts: list[str], max_tokens: int) -> torch.Tensor:
    ids, mask = tokenize_captions(tokenizer, texts, max_tokens)
    device = model.logit_scale.device
    return F.normalize(model.get_text_features(input_ids=ids.to(device), attention_mask=mask.to(device)
                                               ).pooler_output, dim=-1)


@torch.no_grad()
def class_embeddings(model: CLIPModel, tokenizer, prompts_per_class: list[list[str]], max_tokens: int) -> torch.Tensor:
    """One embedding per class: the normalised mean of its prompts' embeddings (CLIP's prompt ensembling)."""
    flat = [p for prompts in prompts_per_class for p in prompts]
    embeds = text_embeddings(model, tokenizer, flat, max_tokens)
    sizes = [len(p) for p in prompts_per_class]
    return F.normalize(torch.stack([chunk.mean(0) for chunk in torch.split(embeds, sizes)]), dim=-1)
