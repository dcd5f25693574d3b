"""`mm_projector` F_h: vision width d_v -> LLM width d_h, shared by the CLS token and the patches.

`linear` is LLaVA-1's projector, `mlp2x_gelu` LLaVA-1.5's. The optional LayerNorm in front is our
addition: without it, raw CLIP features fed a gradient-trained codebook collapsed (docs/experiments.md).
"""

from __future__ import annotations

from torch import nn


def build_mm_projector(kind: str, vision_width: int, llm_width: int, layernorm: bool = True) -> nn.Module:
    layers: list[nn.Module] = [nn.LayerNorm(vision_width)] if layernorm else []
    if kind == "linear":
        layers.append(nn.Linear(vision_width, llm_width))
    elif kind == "mlp2x_gelu":
        layers += [nn.Linear(vision_width, llm_width), nn.GELU(), nn.Linear(llm_width, llm_width)]
    else:
        raise ValueError(f"unknown mm_projector type {kind!r}; use 'linear' or 'mlp2x_gelu'")
    return nn.Sequential(*layers)
