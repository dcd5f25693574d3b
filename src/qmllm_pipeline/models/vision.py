"""The vision tower F_v: a CLIP vision model that returns the CLS token and the patch tokens of one layer.

LLaVA's `CLIPVisionTower` drops the CLS token and wraps its forward in `torch.no_grad()`. Q-MLLM needs
the CLS token (token 0, taken explicitly), and attacks need pixel gradients, so this wrapper does
neither: freeze it with `requires_grad_(False)` and control gradients at the call site.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import CLIPModel, CLIPVisionModel


class VisionTower(nn.Module):
    def __init__(self, vision_model, select_layer: int = -2, cls_source: str = "layer"):
        """`vision_model`: a transformers CLIP vision transformer (`CLIPModel.vision_model` or
        `CLIPVisionModel.vision_model`). `select_layer` indexes `hidden_states` (LLaVA uses -2).
        `cls_source`: 'layer' takes token 0 of that layer; 'pooled' takes CLIP's post-layernormed CLS."""
        super().__init__()
        if cls_source not in ("layer", "pooled"):
            raise ValueError(f"cls_source must be 'layer' or 'pooled', got {cls_source!r}")
        self.vision_model = vision_model
        self.select_layer = select_layer
        self.cls_source = cls_source

    @classmethod
    def from_clip(cls, model: CLIPModel | CLIPVisionModel, **kwargs) -> VisionTower:
        return cls(model.vision_model, **kwargs)

    @property
    def hidden_size(self) -> int:
        return self.vision_model.config.hidden_size

    @property
    def num_patches(self) -> int:
        config = self.vision_model.config
        return (config.image_size // config.patch_size) ** 2

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """pixel_values (B, 3, H, W) -> cls_features (B, d_v), patch_features (B, N, d_v)."""
        outputs = self.vision_model(pixel_values=pixel_values, output_hidden_states=True)
        hidden = outputs.hidden_states[self.select_layer]
        cls_features = outputs.pooler_output if self.cls_source == "pooled" else hidden[:, 0]
        return cls_features, hidden[:, 1:]
