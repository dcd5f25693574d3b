"""The Q-MLLM model: encode, project, quantize, splice the image tokens into the LLM input, generate.

    cls_features, patch_features = vision_tower(image)          # F_v, frozen
    h_cls, H_v = mm_projector(cls_features), mm_projector(patch_features)   # F_h, shared
    cls_index = argmin ||h_cls - C_cls||^2 ; patch_indices = argmin ||H_v - C_patch||^2
    LLM([C_patch[patch_indices] ; embed(text)])                 # spliced at the <image> token

The continuous `baseline` is the same class with no quantizers: its patch tokens are H_v itself.
Everything here works on cached features too (`encode_features`), so stage 1 never touches pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from qmllm_pipeline.models.quantizer import QuantizerOutput, VectorQuantizer

IGNORE_INDEX = -100


@dataclass
class ImageEncoding:
    h_cls: torch.Tensor                      # (B, d_h) projected CLS
    patch_hidden: torch.Tensor               # (B, N, d_h) projected patches H_v
    image_tokens: torch.Tensor               # (B, N, d_h) what the LLM reads: quantized or H_v
    cls: QuantizerOutput | None = None       # cls_index is cls.indices
    patches: QuantizerOutput | None = None   # patch_indices is patches.indices


class QMLLM(nn.Module):
    def __init__(self, mm_projector: nn.Module, llm, image_token_id: int, vision_tower: nn.Module | None = None,
                 cls_quantizer: VectorQuantizer | None = None, patch_quantizer: VectorQuantizer | None = None):
        super().__init__()
        self.vision_tower = vision_tower
        self.mm_projector = mm_projector
        self.cls_quantizer = cls_quantizer
        self.patch_quantizer = patch_quantizer
        self.llm = llm
        self.image_token_id = image_token_id

    @property
    def quantized(self) -> bool:
        return self.patch_quantizer is not None

    # -- image side -------------------------------------------------------------------------------
    def encode_features(self, cls_features: torch.Tensor, patch_features: torch.Tensor,
                        straight_through: bool = True) -> ImageEncoding:
        """`straight_through=False` is the model as deployed: the image tokens are a codebook lookup at the
        argmin, with no gradient to the features (what a plain gradient attacker meets)."""
        h_cls = self.mm_projector(cls_features)
        patch_hidden = self.mm_projector(patch_features)
        cls = self.cls_quantizer(h_cls) if self.cls_quantizer is not None else None
        patches = self.patch_quantizer(patch_hidden) if self.patch_quantizer is not None else None
        if patches is None:
            image_tokens = patch_hidden
        elif straight_through:
            image_tokens = patches.quantized
        else:
            image_tokens = self.patch_quantizer.lookup(patches.indices)
        return ImageEncoding(h_cls, patch_hidden, image_tokens, cls, patches)

    def encode_images(self, pixel_values: torch.Tensor, straight_through: bool = True) -> ImageEncoding:
        if self.vision_tower is None:
            raise ValueError("this QMLLM has no vision tower (built for cached features)")
        return self.encode_features(*self.vision_tower(pixel_values), straight_through=straight_through)

    def cls_index(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The safety check's path only: vision tower, projector on the CLS token, nearest semantic code."""
        cls_features, _ = self.vision_tower(pixel_values)
        return self.cls_quantizer.nearest(self.mm_projector(cls_features))

    # -- text side --------------------------------------------------------------------------------
    def splice(self, input_ids: list[list[int]], labels: list[list[int]] | None,
               image_tokens: torch.Tensor | None, padding: str = "right") -> dict[str, torch.Tensor]:
        """Replace each sequence's `<image>` token by its N image tokens (labels IGNORE_INDEX there) and pad.

        Sequences without `<image>` (text-only replay) pass through; `image_tokens` row i belongs to the
        i-th sequence that has one. Returns inputs_embeds, attention_mask and (if given) labels.
        """
        embed = self.llm.get_input_embeddings()
        rows, row_labels = [], []
        next_image = 0
        for i, ids in enumerate(input_ids):
            ids_tensor = torch.tensor(ids, dtype=torch.long)
            target = torch.tensor(labels[i], dtype=torch.long) if labels is not None else None
            positions = (ids_tensor == self.image_token_id).nonzero().flatten()
            if len(positions) > 1:
                raise ValueError(f"sequence {i} has {len(positions)} {self.image_token_id} tokens; one image each")
            if len(positions) == 0:
                rows.append(embed(ids_tensor))
                row_labels.append(target)
                continue
            if image_tokens is None or next_image >= len(image_tokens):
                raise ValueError("more <image> placeholders than images")
            at = int(positions[0])
            image = image_tokens[next_image].to(embed.weight.dtype)
            next_image += 1
            rows.append(torch.cat([embed(ids_tensor[:at]), image, embed(ids_tensor[at + 1:])]))
            if target is not None:
                ignore = torch.full((image.shape[0],), IGNORE_INDEX, dtype=torch.long)
                row_labels.append(torch.cat([target[:at], ignore, target[at + 1:]]))
        return _pad(rows, row_labels if labels is not None else None, padding)

    def forward(self, input_ids: list[list[int]], labels: list[list[int]], image_tokens: torch.Tensor | None):
        batch = self.splice(input_ids, labels, image_tokens)
        return self.llm(inputs_embeds=batch["inputs_embeds"], attention_mask=batch["attention_mask"],
                        labels=batch["labels"])

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], image_tokens: torch.Tensor | None, max_new_tokens: int,
                 pad_token_id: int, eos_token_id: int, min_new_tokens: int = 0) -> torch.Tensor:
        """Greedy continuation of each prompt (token ids, `<image>` spliced), left-padded; returns new ids.
        `min_new_tokens` forces a length (benchmarks compare equal work)."""
        batch = self.splice(prompts, None, image_tokens, padding="left")
        return self.llm.generate(inputs_embeds=batch["inputs_embeds"], attention_mask=batch["attention_mask"],
                                 max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, do_sample=False,
                                 pad_token_id=pad_token_id, eos_token_id=eos_token_id)


def _pad(rows: list[torch.Tensor], labels: list[torch.Tensor] | None, padding: str) -> dict[str, torch.Tensor]:
    longest = max(r.shape[0] for r in rows)
    width = rows[0].shape[1]
    embeds = rows[0].new_zeros((len(rows), longest, width))
    mask = torch.zeros((len(rows), longest), dtype=torch.long)
    out_labels = torch.full((len(rows), longest), IGNORE_INDEX, dtype=torch.long) if labels is not None else None
    for i, row in enumerate(rows):
        span = slice(0, row.shape[0]) if padding == "right" else slice(longest - row.shape[0], longest)
        embeds[i, span] = row
        mask[i, span] = 1
        if out_labels is not None:
            out_labels[i, span] = labels[i]
    batch = {"inputs_embeds": embeds, "attention_mask": mask}
    if out_labels is not None:
        batch["labels"] = out_labels
    return batch
