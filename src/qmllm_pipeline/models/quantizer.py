"""Vector quantization: the discrete bottleneck of Q-MLLM (`cls_quantizer`, K codes; `patch_quantizer`, P codes).

Forward: nearest code by squared L2, computed as one fused matrix product (||C||^2 - 2 x C^T; ||x||^2 does
not change the argmin), never as a Python loop or an N x K x d broadcast; straight-through estimator so the
projector still gets a gradient in training. The argmin itself has no gradient, which is the defense at
inference time.

Two codebook update rules:
- `gradient`: the paper's rule, L_vq = ||sg[x] - C||^2 + lambda_commit ||x - sg[C]||^2 (collapses here);
- `ema`: moving-average code updates (VQ-VAE-2), with only the commitment term as a loss (default).
Both get k-means initialisation from the first batch and dead-code restart. Under several training
processes (`models/distributed.py`) the EMA statistics are summed over them, so every process holds the
codebook one process would have on the whole batch.

Two distances: `l2` (the paper) and `cosine` (the released v2 code's CLS codebook): inputs and codes are
kept on the unit sphere, where the squared-L2 argmin is the cosine argmax, so one lookup serves both.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from qmllm_pipeline.models.distributed import all_sum, from_main, gathered


@dataclass
class QuantizerOutput:
    quantized: torch.Tensor       # straight-through: forward = codes, backward = identity to x
    indices: torch.Tensor         # (...,) code index per vector
    loss: torch.Tensor            # the VQ loss to add (codebook + commitment, or commitment only for EMA)
    codebook_loss: torch.Tensor
    commitment_loss: torch.Tensor


class VectorQuantizer(nn.Module):
    def __init__(self, num_codes: int, dim: int, commitment: float = 0.25, update: str = "ema", decay: float = 0.99,
                 dead_code_threshold: float = 1e-3, kmeans_iters: int = 10, epsilon: float = 1e-5,
                 distance: str = "l2"):
        super().__init__()
        if update not in ("ema", "gradient"):
            raise ValueError(f"update must be 'ema' or 'gradient', got {update!r}")
        if distance not in ("l2", "cosine"):
            raise ValueError(f"distance must be 'l2' or 'cosine', got {distance!r}")
        if distance == "cosine" and update != "ema":
            raise ValueError("the cosine distance keeps codes on the unit sphere through EMA updates; use update='ema'")
        self.distance = distance
        self.num_codes, self.dim = num_codes, dim
        self.commitment, self.update, self.decay = commitment, update, decay
        self.dead_code_threshold, self.kmeans_iters, self.epsilon = dead_code_threshold, kmeans_iters, epsilon
        self.codebook = nn.Parameter(torch.randn(num_codes, dim) * dim ** -0.5, requires_grad=update == "gradient")
        self.register_buffer("initialized", torch.tensor(False))
        self.register_buffer("ema_counts", torch.ones(num_codes))
        self.register_buffer("ema_sums", self.codebook.detach().clone())
        self.register_buffer("usage", torch.zeros(num_codes))  # decayed assignment counts, for restarts

    # -- lookup -----------------------------------------------------------------------------------
    def nearest(self, flat: torch.Tensor) -> torch.Tensor:
        """argmin_k ||x - C_k||^2 for each row of `flat` (N, d), as one fused matrix product. ||x||^2 is the
        same for every k, so it is left out: argmin_k ||C_k||^2 - 2 x.C_k (`qmllm bench`, row 4). With the
        cosine distance the rows are normalised first (the codes already are)."""
        codebook = self.codebook.detach()
        if self.distance == "cosine":
            flat = F.normalize(flat, dim=-1)
        return torch.addmm(codebook.pow(2).sum(1), flat, codebook.T, beta=1, alpha=-2).argmin(dim=1)

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """The codebook rows of `indices` (any shape), on the codebook's device whatever the indices'."""
        return F.embedding(indices.to(self.codebook.device), self.codebook)

    def flip_distance(self, x: torch.Tensor, relative: bool = False) -> torch.Tensor:
        """The smallest L2 move of each vector of `x` (..., d) that changes its code: the distance to the
        nearest face of its Voronoi cell, min over k != c of (||x - C_k||^2 - ||x - C_c||^2) / (2 ||C_k - C_c||)
        with c its code (exact for the squared-L2 argmin; on the unit sphere for the cosine distance). A
        perturbation that moves a feature by less leaves its code as it is. Differentiable in `x` (the codes
        are held fixed): the stage-1 margin term pushes it up. `relative`: in units of the codebook's half
        spacing (half the mean distance from a code to its nearest other code: the flip distance a vector
        sitting on its code has, on average)."""
        flat = x.reshape(-1, self.dim)
        if self.distance == "cosine":
            flat = F.normalize(flat, dim=-1)
        codebook = self.codebook.detach()
        pairs = torch.cdist(codebook, codebook)  # (P, P): ||C_k - C_j||
        squared = torch.addmm(codebook.pow(2).sum(1), flat, codebook.T, beta=1, alpha=-2)  # ||x-C||^2 - ||x||^2
        code = squared.detach().argmin(1)
        gap = pairs[code]  # (n, P): ||C_k - C_c||
        faces = (squared - squared.gather(1, code[:, None])) / (2 * gap.clamp(min=self.epsilon))
        faces = faces.masked_fill(F.one_hot(code, self.num_codes).bool() | (gap <= self.epsilon), float("inf"))
        flips = faces.min(1).values.view(x.shape[:-1])
        if relative:
            flips = flips / (pairs.clone().fill_diagonal_(float("inf")).min(1).values.mean() / 2)
        return flips

    # -- training-time codebook maintenance -------------------------------------------------------
    @torch.no_grad()
    def kmeans_init(self, flat: torch.Tensor, examples: int | None = None) -> None:
        """Codes start as k-means centroids of the first batch (k-means++-free: random distinct rows). Under
        several training processes, of the whole batch (every process's share of `examples` examples, put
        back in the batch's order), and rank 0's result on all."""
        flat = gathered(flat, examples)
        if flat.shape[0] >= self.num_codes:
            centroids = flat[torch.randperm(flat.shape[0], device=flat.device)[: self.num_codes]].clone()
        else:
            repeats = flat[torch.randint(flat.shape[0], (self.num_codes,), device=flat.device)]
            centroids = repeats + 0.01 * flat.std() * torch.randn_like(repeats)
        for _ in range(self.kmeans_iters):
            assign = (flat.pow(2).sum(1, keepdim=True) - 2 * flat @ centroids.T + centroids.pow(2).sum(1)).argmin(1)
            counts = torch.bincount(assign, minlength=self.num_codes).float()
            sums = torch.zeros_like(centroids).index_add_(0, assign, flat)
            filled = counts > 0
            centroids[filled] = sums[filled] / counts[filled, None]
        self.codebook.data.copy_(from_main(self._on_sphere(centroids)))
        self.ema_sums.copy_(from_main(centroids))
        self.ema_counts.fill_(1.0)
        self.initialized.fill_(True)

    @torch.no_grad()
    def _ema_update(self, flat: torch.Tensor, indices: torch.Tensor) -> None:
        """The moving averages over the whole batch: under several training processes the counts and sums
        of every process's share are added up first, so that every process keeps the same codebook."""
        counts = all_sum(torch.bincount(indices, minlength=self.num_codes).float())
        sums = all_sum(torch.zeros_like(self.ema_sums).index_add_(0, indices, flat))
        self.ema_counts.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.ema_sums.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        total = self.ema_counts.sum()
        smoothed = (self.ema_counts + self.epsilon) / (total + self.num_codes * self.epsilon) * total  # Laplace
        self.codebook.data.copy_(self._on_sphere(self.ema_sums / smoothed[:, None]))

    def _on_sphere(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes as stored: unit vectors for the cosine distance, unchanged for L2."""
        return F.normalize(codes, dim=-1) if self.distance == "cosine" else codes

    @torch.no_grad()
    def _restart_dead_codes(self, flat: torch.Tensor, indices: torch.Tensor, examples: int | None = None) -> int:
        """Codes whose share of recent assignments fell below `dead_code_threshold / num_codes` jump to random
        current inputs (of the whole batch under several training processes); returns how many were
        restarted."""
        self.usage.mul_(self.decay).add_(all_sum(torch.bincount(indices, minlength=self.num_codes).float()),
                                         alpha=1 - self.decay)
        share = self.usage / self.usage.sum().clamp(min=self.epsilon)
        dead = torch.nonzero(share < self.dead_code_threshold / self.num_codes).flatten()
        if len(dead) == 0:
            return 0
        flat = gathered(flat, examples)
        picks = from_main(flat[torch.randint(flat.shape[0], (len(dead),), device=flat.device)].contiguous())
        self.codebook.data[dead] = picks
        self.ema_sums[dead] = picks
        self.ema_counts[dead] = 1.0
        self.usage[dead] = self.usage.mean()
        return len(dead)

    # -- forward ----------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> QuantizerOutput:
        flat = x.reshape(-1, self.dim)
        if self.distance == "cosine":
            flat = F.normalize(flat, dim=-1)
        examples = x.shape[0] if x.dim() > 1 else None  # the batch's examples, for several processes
        if self.training and not bool(self.initialized):
            self.kmeans_init(flat.detach(), examples)
        indices = self.nearest(flat.detach())
        codes = self.lookup(indices)
        commitment_loss = F.mse_loss(flat, codes.detach())
        if self.update == "gradient":
            codebook_loss = F.mse_loss(codes, flat.detach())
            loss = codebook_loss + self.commitment * commitment_loss
        else:
            codebook_loss = F.mse_loss(codes.detach(), flat.detach())  # reported, not optimised
            loss = self.commitment * commitment_loss
        if self.training:
            if self.update == "ema":
                self._ema_update(flat.detach(), indices)
            self._restart_dead_codes(flat.detach(), indices, examples)
        quantized = flat + (codes - flat).detach()  # straight-through estimator
        return QuantizerOutput(quantized.view_as(x), indices.view(x.shape[:-1]), loss, codebook_loss,
                               commitment_loss)

    # -- health -----------------------------------------------------------------------------------
    @torch.no_grad()
    def usage_stats(self, indices: torch.Tensor) -> dict[str, float]:
        """Share of codes used and perplexity (exp of the entropy of code frequencies) over `indices`."""
        counts = torch.bincount(indices.flatten(), minlength=self.num_codes).float()
        probabilities = counts / counts.sum().clamp(min=1)
        entropy = -(probabilities[probabilities > 0] * probabilities[probabilities > 0].log()).sum()
        return {"codes_used": int((counts > 0).sum()), "usage": float((counts > 0).float().mean()),
                "perplexity": float(entropy.exp())}
