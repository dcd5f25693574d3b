"""The SafeCLIP-style pre-detection baseline: CLIP zero-shot against text descriptions of each category;
refuse when a toxic category's confidence exceeds a threshold (0.6 in SafeCLIP)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from qmllm_pipeline.models.clip import class_embeddings, image_embeddings
from qmllm_pipeline.models.device import resolve_device

NEUTRAL = "neutral"


class SafeCLIPFilter:
    def __init__(self, clip_model, tokenizer, processor, descriptions: dict[str, list[list[str]]],
                 threshold: float = 0.6, device: str | torch.device | None = None, max_tokens: int = 32):
        """`descriptions[category]` is a list of classes, each a list of prompts averaged into one text
        embedding (prompt ensembling); a category's confidence is the softmax mass of its classes. `device`:
        where CLIP runs (the `device` setting; None: where `clip_model` is)."""
        if not 0 <= threshold < 1:  # also NaN: a threshold outside [0, 1) refuses everything or nothing
            raise ValueError(f"SafeCLIP threshold must lie in [0, 1), got {threshold!r}")
        if device is not None:
            clip_model.to(resolve_device(device))
        self.clip_model, self.processor, self.threshold = clip_model, processor, threshold
        self.class_category = np.asarray([c for c, classes in descriptions.items() for _ in classes])
        prompts = [prompts for classes in descriptions.values() for prompts in classes]
        self.class_embeds = class_embeddings(clip_model, tokenizer, prompts, max_tokens)
        self.toxic_categories = [c for c in descriptions if c != NEUTRAL]

    @torch.no_grad()
    def scores(self, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """(most likely toxic category, its confidence) per uint8 image."""
        return self._scores(image_embeddings(self.clip_model, self.processor, images))

    @torch.no_grad()
    def pixel_scores(self, pixels: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """`scores` on normalised pixel values."""
        pixels = pixels.to(self.class_embeds.device)
        return self._scores(F.normalize(self.clip_model.get_image_features(pixel_values=pixels).pooler_output, dim=-1))

    def _scores(self, embeddings: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        logits = self.clip_model.logit_scale.exp() * embeddings @ self.class_embeds.T
        probabilities = logits.softmax(dim=1).cpu().numpy()
        per_category = np.stack([probabilities[:, self.class_category == c].sum(1) for c in self.toxic_categories], 1)
        best = per_category.argmax(1)
        return np.asarray(self.toxic_categories)[best], per_category[np.arange(len(best)), best]

    def refused(self, images: torch.Tensor) -> np.ndarray:
        return refuse_above(self.scores(images)[1], self.threshold)


def refuse_above(confidence: np.ndarray, threshold: float) -> np.ndarray:
    """Refuse where the confidence exceeds the threshold, and where it is NaN (a score that cannot be read
    never passes)."""
    return ~(np.asarray(confidence) <= threshold)
