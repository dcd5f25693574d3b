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
    def __init__(self, vision_model, select_layer: int = -2, cls_source: str = "layer",
                 visual_projection: nn.Module | None = None):
        """`vision_model`: a transformers CLIP vision transformer (`CLIPModel.vision_model` or
        `CLIPVisionModel.vision_model`). `select_layer` indexes `hidden_states` (LLaVA uses -2).
        `cls_source`: 'layer' takes token 0 of that layer; 'pooled' takes CLIP's post-layernormed CLS;
        'projected' takes CLIP's final image embedding (pooled CLS through `visual_projection`)."""
        super().__init__()
        if cls_source not in ("layer", "pooled", "projected"):
            raise ValueError(f"cls_source must be 'layer', 'pooled' or 'projected', got {cls_source!r}")
        if cls_source == "projected" and visual_projection is None:
            raise ValueError("cls_source 'projected' needs CLIP's visual_projection (use VisionTower.from_clip)")
        self.vision_model = vision_model
        self.select_layer = select_layer
        self.cls_source = cls_source
        self.visual_projection = visual_projection

    @classmethod
    def from_clip(cls, model: CLIPModel | CLIPVisionModel, **kwargs) -> VisionTower:
        return cls(model.vision_model, visual_projection=getattr(model, "visual_projection", None), **kwargs)

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
        if self.cls_source == "layer":
            cls_features = hidden[:, 0]
        elif self.cls_source == "pooled":
            cls_features = outputs.pooler_output
        else:
            cls_features = self.visual_projection(outputs.pooler_output)
        return cls_features, hidden[:, 1:]
