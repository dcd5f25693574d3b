"""The name head: up to `slots` object names read off the image and handed to the LLM as its own tokens.

A tiny LLM cannot learn, from the few hundred naming turns a stage-2 run sees, to map hundreds of visual
codes onto hundreds of names (a linear probe trained in batches of 32 needs thousands of steps to get there;
docs/experiments.md). CLIP, trained contrastively against the object phrases, already separates the
names. So a small classifier on the cached vision features (`NameHead`) picks, for each slot in reading
order (left to right), one entry of a closed name vocabulary or "empty", and the LLM reads each pick as the
name's own token embeddings, `slot_width` of them per slot (padded):

    logits = name_head(cls_features, patch_features)       # (B, slots, names + 1)
    qmllm:    tokens = embed(token_ids[argmax logits])       # a discrete pick, like any codebook lookup
    baseline: tokens = softmax(logits) @ embed(token_ids)    # the same table read continuously

so copying, which a language model learns from few examples, is all that is left to learn. The empty
entry fills the slots past the last object: how many slots are filled is the count (with `counted`, a count
pick of its own decides it, `NameHead.compose`). With a background slot
the head also names the background colour, from the same vocabulary grown by the colour words, after the
objects (as the captions say it).

For the quantized model the pick is an argmax: no gradient reaches the pixels through it, and an attacker
must flip whole names (the adaptive attacker's straight-through estimator does that: `straight_through`).
The continuous baseline reads the softmax mixture, so its name tokens are as open to gradients as its patch
tokens. The name vocabulary is a closed set (the emoji world's catalogue); the real configuration has none
and runs without the head (`slots=0`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

NAME_HEAD_INPUTS = ("cls", "cls_mean_patch", "cls_patches")


class NameHead(nn.Module):
    def __init__(self, names: int, slots: int, slot_width: int, cls_width: int, patch_width: int,
                 num_patches: int, inputs: str = "cls_patches", hidden: int = 512, patch_dim: int = 32,
                 dropout: float = 0.1, counted: int = 0):
        """`names` vocabulary entries (the empty pick is entry `names`), `slots` picks per image of at most
        `slot_width` tokens each. `inputs`: what the classifier reads: `cls` (the CLS feature only),
        `cls_mean_patch` (with the mean patch feature) or `cls_patches` (with every patch feature, in grid
        order, so it can tell left from right, each first reduced to `patch_dim` by one shared linear map).
        `dropout` before the output layer: the head sees each name a few hundred times. `counted` > 0: the
        first `counted` slots are filled by a count pick of their own (`compose`), not each on its own."""
        super().__init__()
        if inputs not in NAME_HEAD_INPUTS:
            raise ValueError(f"name head inputs must be one of {NAME_HEAD_INPUTS}, got {inputs!r}")
        if not 0 <= counted <= slots:
            raise ValueError(f"a name head of {slots} slots cannot count {counted} of them")
        self.names, self.slots, self.slot_width, self.inputs = names, slots, slot_width, inputs
        self.counted = counted
        self.patch_projection = nn.Linear(patch_width, patch_dim) if inputs == "cls_patches" else None
        width = cls_width + {"cls": 0, "cls_mean_patch": patch_width, "cls_patches": num_patches * patch_dim}[inputs]
        self.classifier = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, hidden), nn.GELU(), nn.Dropout(dropout),
                                        nn.Linear(hidden, slots * (names + 1) + (counted + 1 if counted else 0)))
        # each entry spelled in the LLM's tokens, padded; set by `set_vocabulary`, saved with the weights
        self.register_buffer("token_ids", torch.zeros(names + 1, slot_width, dtype=torch.long))

    @classmethod
    def from_config(cls, config, dropout: float = 0.1) -> NameHead | None:
        """The name head a `QMLLMConfig` describes (None where `name_slots` is 0): the one place its fields
        become a head, for the model and for the name head's own training."""
        if not config.name_slots:
            return None
        return cls(len(config.name_vocabulary), config.name_slots, config.name_slot_width,
                   config.name_cls_width or config.vision_width, config.vision_width, config.num_patches or 0,
                   config.name_head_inputs, config.name_head_hidden, config.name_head_patch_dim, dropout,
                   counted=config.name_counted)

    @property
    def empty(self) -> int:
        """The index of the empty pick."""
        return self.names

    def set_vocabulary(self, token_ids: list[list[int]], pad_id: int) -> NameHead:
        """The token ids of each name (in vocabulary order), padded with `pad_id`; the empty pick is all pad."""
        if len(token_ids) != self.names:
            raise ValueError(f"{len(token_ids)} spelled names for a head of {self.names}")
        table = torch.full((self.names + 1, self.slot_width), pad_id, dtype=torch.long)
        for row, ids in enumerate(token_ids):
            if not 0 < len(ids) <= self.slot_width:
                raise ValueError(f"name {row} has {len(ids)} tokens; slots hold 1 to {self.slot_width}")
            table[row, :len(ids)] = torch.tensor(ids)
        self.token_ids.copy_(table)
        return self

    def forward(self, cls_features: torch.Tensor, patch_features: torch.Tensor) -> torch.Tensor:
        """cls_features (B, d_cls), patch_features (B, N, d_v) -> logits (B, slots, names + 1) (for a counted
        head, log-probabilities: see `compose`)."""
        parts = [cls_features]
        if self.inputs == "cls_mean_patch":
            parts.append(patch_features.mean(1))
        elif self.inputs == "cls_patches":
            parts.append(self.patch_projection(patch_features).flatten(1))
        scores = self.classifier(torch.cat(parts, -1))
        width = self.slots * (self.names + 1)
        logits = scores[:, :width].view(len(cls_features), self.slots, self.names + 1)
        return self.compose(logits, scores[:, width:]) if self.counted else logits

    def compose(self, logits: torch.Tensor, count_logits: torch.Tensor) -> torch.Tensor:
        """One distribution per slot out of two factors: slot s < `counted` is filled with the probability
        that the count exceeds s, and then named by its own softmax over the names (its empty score unused):

            p_s(name) = P(count > s) softmax(logits_s[:names])(name),   p_s(empty) = P(count <= s)

        returned as log-probabilities (count_logits (B, counted + 1) score the counts 0..counted). The slots'
        fill is consistent (a filled slot never follows an empty one) and the count is one decision: naming
        each slot on its own let an unsure name lose to the empty pick, and three-object scenes were counted
        as two. Slots past `counted` (the background) keep their plain logits."""
        log_count = count_logits.float().log_softmax(-1)
        at_most = torch.logcumsumexp(log_count, -1)[:, :self.counted]                   # log P(count <= s)
        more = torch.logcumsumexp(log_count.flip(-1), -1).flip(-1)[:, 1:]              # log P(count > s)
        named = logits[:, :self.counted, :self.names].float().log_softmax(-1) + more[..., None]
        counted = torch.cat([named, at_most[..., None]], -1)
        return torch.cat([counted.to(logits.dtype), logits[:, self.counted:]], 1)

    def count_probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """(B, counted + 1) a counted head's P(count = 0..counted), read back from its slots' empty entries."""
        at_most = logits[:, :self.counted, self.names].float().exp()                    # P(count <= s)
        cumulative = torch.cat([at_most, torch.ones_like(at_most[:, :1])], -1)
        return torch.diff(cumulative, dim=-1, prepend=torch.zeros_like(at_most[:, :1])).clamp_min(0)

    def picks(self, logits: torch.Tensor) -> torch.Tensor:
        """(B, slots) the vocabulary entry of each slot: the argmax; for a counted head, the most likely count
        fills that many slots, each with its most likely name."""
        picks = logits.argmax(-1)
        if not self.counted:
            return picks
        count = self.count_probabilities(logits).argmax(-1)
        filled = torch.arange(self.counted, device=logits.device) < count[:, None]
        names = logits[:, :self.counted, :self.names].argmax(-1)
        picks[:, :self.counted] = torch.where(filled, names, torch.full_like(names, self.empty))
        return picks

    def tokens(self, logits: torch.Tensor, embedding: nn.Embedding, quantized: bool,
               straight_through: bool = False) -> torch.Tensor:
        """The name tokens the LLM reads, (B, slots * slot_width, d_h), from `embedding` (the LLM's input
        embeddings, read now: stage 2 trains them). Quantized: the argmax entry's embeddings (with
        `straight_through`, the softmax's gradient passes as if the pick were soft); continuous: the
        softmax-weighted mixture of every entry's embeddings."""
        soft = logits.float().softmax(-1)
        if quantized:
            picks = self.picks(logits.detach())
            hard = F.one_hot(picks, self.names + 1).to(soft.dtype)
            weights = hard + soft - soft.detach() if straight_through else hard
        else:
            weights = soft
        if quantized and not straight_through:  # a plain lookup: exactly the entries' embeddings
            return self.lookup(picks, embedding).to(soft.dtype)
        table = embedding(self.token_ids).to(weights.dtype)  # (names + 1, slot_width, d_h)
        tokens = torch.einsum("bsn,nld->bsld", weights, table)
        return tokens.reshape(len(logits), self.slots * self.slot_width, -1)

    def lookup(self, picks: torch.Tensor, embedding: nn.Embedding) -> torch.Tensor:
        """The name tokens (B, slots * slot_width, d_h) of given picks (B, slots), entries 0..names (the empty
        one included): each slot is its entry's token embeddings, as Q-MLLM reads an argmax pick."""
        rows = embedding(self.token_ids)[picks.to(self.token_ids.device)]
        return rows.reshape(len(picks), self.slots * self.slot_width, -1)


def slot_targets(item_ids: list[list[int]], vocabulary: list[int], slots: int, backgrounds: list[str] | None = None,
                 background_names: list[str] = ()) -> torch.Tensor:
    """(B, slots [+ 1]) training targets: each scene's objects in reading order as indices of `vocabulary` (the
    names' item ids), then the empty pick; with `backgrounds` (one per scene) one more slot naming it, as
    index len(vocabulary) + its place in `background_names`. The empty pick is the last entry,
    len(vocabulary) + len(background_names). Objects past the last slot are dropped."""
    index = {item: i for i, item in enumerate(vocabulary)}
    colours = {name: len(vocabulary) + i for i, name in enumerate(background_names)}
    empty = len(vocabulary) + len(background_names)
    rows = []
    for row, items in enumerate(item_ids):
        picks = [index[int(i)] for i in list(items)[:slots]]
        picks += [empty] * (slots - len(picks))
        if backgrounds is not None:
            picks.append(colours[backgrounds[row]])
        rows.append(picks)
    return torch.tensor(rows, dtype=torch.long)


def name_head_losses(head: NameHead, cls_features: torch.Tensor, patch_features: torch.Tensor,
                     targets: torch.Tensor) -> dict[str, torch.Tensor]:
    """Cross-entropy per slot, averaged, and the share of scenes whose every slot is right; a counted head also
    pays the cross-entropy of its count (`count_loss`, added to `loss`)."""
    device = next(head.parameters()).device  # rows come in on the CPU
    cls_features, patch_features, targets = (t.to(device) for t in (cls_features, patch_features, targets))
    logits = head(cls_features.float(), patch_features.float())
    loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
    losses = {}
    if head.counted:
        counts = (targets[:, :head.counted] != head.empty).sum(-1)
        losses["count_loss"] = F.nll_loss(head.count_probabilities(logits).clamp_min(1e-12).log(), counts)
        loss = loss + losses["count_loss"]
    exact = (head.picks(logits.detach()) == targets).all(-1).float().mean()
    return {"loss": loss, **losses, "exact": exact}
