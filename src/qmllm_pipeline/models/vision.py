"""The vision tower F_v: a CLIP vision model that returns the CLS token and the patch tokens of one layer.

LLaVA's `CLIPVisionTower` drops the CLS token and wraps its forward in `torch.no_grad()`. Q-MLLM needs
the CLS token (token 0, taken explicitly), and attacks need pixel gradients, so this wrapper does
neither: freeze it with `requires_grad_(False)` and control gradients at the call site.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPModel, CLIPVisionModel


class VisionTower(nn.Module):
    def __init__(self, vision_model, select_layer: int = -2, cls_source: str = "layer",
                 visual_projection: nn.Module | None = None, patch_pool: int = 1):
        """`vision_model`: a transformers CLIP vision transformer (`CLIPModel.vision_model` or
        `CLIPVisionModel.vision_model`). `select_layer` indexes `hidden_states` (LLaVA uses -2).
        `cls_source`: 'layer' takes token 0 of that layer; 'pooled' takes CLIP's post-layernormed CLS;
        'projected' takes CLIP's final image embedding (pooled CLS through `visual_projection`).
        `patch_pool`: average the patch grid over `patch_pool` x `patch_pool` windows, so a fine-patched
        tower still hands the LLM few image tokens (1: every patch)."""
        super().__init__()
        if cls_source not in ("layer", "pooled", "projected"):
            raise ValueError(f"cls_source must be 'layer', 'pooled' or 'projected', got {cls_source!r}")
        if cls_source == "projected" and visual_projection is None:
            raise ValueError("cls_source 'projected' needs CLIP's visual_projection (use VisionTower.from_clip)")
        grid = vision_model.config.image_size // vision_model.config.patch_size
        if patch_pool < 1 or grid % patch_pool:
            raise ValueError(f"patch_pool {patch_pool} must divide the {grid}x{grid} patch grid")
        self.vision_model = vision_model
        self.select_layer = select_layer
        self.cls_source = cls_source
        self.visual_projection = visual_projection
        self.patch_pool = patch_pool

    @classmethod
    def from_clip(cls, model: CLIPModel | CLIPVisionModel, **kwargs) -> VisionTower:
        return cls(model.vision_model, visual_projection=getattr(model, "visual_projection", None), **kwargs)

    @property
    def hidden_size(self) -> int:
        return self.vision_model.config.hidden_size

    @property
    def grid(self) -> int:
        """Side of the patch grid the vision transformer sees."""
        config = self.vision_model.config
        return config.image_size // config.patch_size

    @property
    def num_patches(self) -> int:
        """Patch tokens handed on (after pooling)."""
        return (self.grid // self.patch_pool) ** 2

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """pixel_values (B, 3, H, W) -> cls_features (B, d_v), patch_features (B, N, d_v), N = num_patches."""
        cls_features, patches = self.features(pixel_values, (self.cls_source,))
        return cls_features[self.cls_source], patches

    def features(self, pixel_values: torch.Tensor, cls_sources: tuple[str, ...]
                 ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """One pass of the tower, the CLS token taken from each of `cls_sources` (the paper's layer token for
        stage 1, CLIP's image embedding for a decoupled CLS head), and the patch features."""
        unknown = set(cls_sources) - {"layer", "pooled", "projected"}
        if unknown or ("projected" in cls_sources and self.visual_projection is None):
            raise ValueError(f"cls sources {sorted(cls_sources)}: each must be 'layer', 'pooled' or 'projected' "
                             "('projected' needs CLIP's visual_projection)")
        pixel_values = pixel_values.to(next(self.vision_model.parameters()).device)  # CPU in, the tower's device
        outputs = self.vision_model(pixel_values=pixel_values, output_hidden_states=True)
        hidden = outputs.hidden_states[self.select_layer]
        cls_features = {}
        for source in cls_sources:
            if source == "layer":
                cls_features[source] = hidden[:, 0]
            elif source == "pooled":
                cls_features[source] = outputs.pooler_output
            else:
                cls_features[source] = self.visual_projection(outputs.pooler_output)
        return cls_features, self._pool(hidden[:, 1:])

    def _pool(self, patches: torch.Tensor) -> torch.Tensor:
        if self.patch_pool == 1:
            return patches
        batch, _, width = patches.shape
        grid = patches.transpose(1, 2).reshape(batch, width, self.grid, self.grid)
        return F.avg_pool2d(grid, self.patch_pool).flatten(2).transpose(1, 2)
