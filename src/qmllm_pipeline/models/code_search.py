"""The code-space attack on Q-MLLM: search directly over the N patch codes the LLM reads, usable without Kedro.

Whatever an image does to Q-MLLM, the LLM only ever receives a sequence of N patch codes, each one of P
codebook rows (and, the safety map's side, one CLS code). An attacker who could pick any code at any
position is stronger than any pixel attacker, who can only reach the sequences some image within eps
encodes to. So a search over code sequences, with the CLS code assumed to be a neutral-labelled one (the
safety map lets the image in), tells whether Q-MLLM's robustness comes from the quantizer (no code sequence
jailbreaks the LLM) or from a weak image attacker (sequences exist, PGD does not find them).

    minimise over codes in {0..P-1}^N:   -log p(target | C_patch[codes], instruction)
                                     or  log p(answer opens with a refusal token | ...)   (`refusal_ids`)
                                     or  the target's mean margin, max(other - target logit, -kappa)   (`kappa`)

by coordinate search with a beam: for each position in turn (a seeded order), every beam member is
extended by every candidate code at that position and the `beam_width` best sequences are kept; the sweep
repeats until a sweep improves nothing or `sweeps` are done. The members themselves are among their
extensions, so the best score never rises above the best start's. The search starts from the clean image's
codes and, when given, from other code sequences per instruction (the codes the image attacks reached): the
`beam_width` lowest-loss of them form the first beam, so the search refines the strongest image attack
instead of rediscovering it.
`candidates=None` tries all P codes at each position (exhaustive coordinate search); an integer k tries the
k codes with the largest first-order gain, g_j . (C[c] - C[code_j]) with g_j the loss's gradient at the
position's token (as GCG, Zou et al. 2023, ranks token swaps), each one then scored exactly.

It is a search, not a proof: a greedy search's best sequence bounds what the image attacks reach from
above only in the sense that it is a strictly stronger attacker; a better search could find more.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from qmllm_pipeline.models.attack import attack_term
from qmllm_pipeline.models.qmllm import QMLLM, ImageEncoding


@dataclass
class CodeObjective:
    """-log p(target_i | codes, instruction_i) of code sequences (B, N) for `sequences[rows]` (lower is better
    for the attacker). `name_tokens` (M, d_h): a name head's tokens, held fixed at the clean image's (the
    search moves patch codes only). With `refusal_ids`, log p(the answer opens with a refusal token) instead
    (`refusal_logprob`); with `kappa`, the target's margin (`target_margin`)."""
    model: QMLLM
    sequences: list[tuple[list[int], list[int]]]
    name_tokens: torch.Tensor | None = None
    refusal_ids: list[int] | None = None
    kappa: float | None = None

    @classmethod
    def from_encoding(cls, model: QMLLM, sequences: list[tuple[list[int], list[int]]], encoding: ImageEncoding,
                      refusal_ids: list[int] | None = None,
                      kappa: float | None = None) -> tuple[CodeObjective, torch.Tensor]:
        """The objective around one encoded (clean) image, and that image's patch codes (N,): where the
        search starts. A name head's tokens are taken from the image and held fixed."""
        codes = encoding.patches.indices[0]
        names = model.name_tokens_of(encoding.image_tokens[:1], len(codes))
        return cls(model, sequences, None if names is None else names[0], refusal_ids, kappa), codes

    def image_tokens(self, codes: torch.Tensor) -> torch.Tensor:
        """What the LLM reads for code sequences (B, N): the codebook rows, with the fixed name tokens."""
        return self.with_names(self.model.patch_quantizer.lookup(codes))

    def with_names(self, patch_tokens: torch.Tensor) -> torch.Tensor:
        """Patch tokens (B, N, d_h) with the fixed name tokens beside them (unchanged without a name head)."""
        if self.name_tokens is None:
            return patch_tokens
        names = self.name_tokens.expand(len(patch_tokens), -1, -1).to(patch_tokens.dtype)
        return self.model._with_names(names, patch_tokens)

    def __call__(self, codes: torch.Tensor, rows: list[int], tokens: torch.Tensor | None = None) -> torch.Tensor:
        """(B,) each code sequence's own loss; `tokens` replaces the lookup (the gradient's leaf)."""
        ids, labels = map(list, zip(*(self.sequences[i] for i in rows), strict=True))
        tokens = self.image_tokens(codes) if tokens is None else tokens
        return attack_term(self.model, ids, labels, tokens, self.refusal_ids, self.kappa)


def _scores(objective: CodeObjective, codes: torch.Tensor, row: int, batch_size: int) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([objective(chunk, [row] * len(chunk)) for chunk in codes.split(batch_size)])


def _ranked_candidates(objective: CodeObjective, beam: torch.Tensor, row: int, position: int,
                       candidates: int | None) -> torch.Tensor:
    """(B, k) the codes to try at `position` for each beam member (B, N): all P, or the k with the largest
    first-order gain of the loss."""
    codebook = objective.model.patch_quantizer.codebook.detach()
    if candidates is None or candidates >= len(codebook):
        return torch.arange(len(codebook)).expand(len(beam), -1)
    lookup = objective.model.patch_quantizer.lookup(beam).detach().requires_grad_(True)
    with torch.enable_grad():
        loss = objective(beam, [row] * len(beam), objective.with_names(lookup))
        grad = torch.autograd.grad(loss.sum(), lookup)[0][:, position]        # (B, d_h)
    gain = grad @ codebook.T - (grad * lookup.detach()[:, position]).sum(-1, keepdim=True)  # predicted change
    return gain.topk(candidates, dim=-1, largest=False).indices


def code_space_search(objective: CodeObjective, start: torch.Tensor, sweeps: int = 1, beam_width: int = 1,
                      candidates: int | None = None, batch_size: int = 256, seed: int = 0,
                      desc: str | None = "code-space search",
                      starts: list[torch.Tensor] | None = None) -> tuple[torch.Tensor, dict]:
    """Beam coordinate search for each sequence of `objective`, from the clean image's patch codes `start`
    (N,) and, with `starts`, also from `starts[i]` (S_i, N) for sequence i (other code sequences, e.g. those
    the image attacks reached). Returns the best code sequence per sequence (n, N), in range [0, P), and the
    history: each sequence's clean-code loss (`start_loss`), the loss of the start it began from
    (`beam_start_loss`; `started_from`: 0 for the clean codes, j for `starts[i][j - 1]`), its best loss, the
    positions changed from the clean codes and the sweeps run."""
    n, positions = len(objective.sequences), len(start)
    if starts is not None and len(starts) != n:
        raise ValueError(f"code-space search: {len(starts)} start sets for {n} sequences")
    generator = torch.Generator().manual_seed(seed)
    best_codes = start.expand(n, -1).clone()
    start_loss, beam_start_loss, best_loss = torch.zeros(n), torch.zeros(n), torch.zeros(n)
    started_from, sweeps_run = [], []
    for row in tqdm(range(n), desc=desc, mininterval=2, disable=desc is None):
        candidates_0 = start[None] if starts is None else torch.cat([start[None], starts[row].to(start)])
        losses_0 = _scores(objective, candidates_0, row, batch_size)
        start_loss[row] = losses_0[0]
        order = losses_0.argsort(stable=True)[:beam_width]   # ties keep the clean codes first
        beam, beam_loss = candidates_0[order], losses_0[order]
        beam_start_loss[row] = beam_loss[0]
        started_from.append(int(order[0]))
        done = 0
        for _ in range(sweeps):
            before = float(beam_loss[0])
            for position in torch.randperm(positions, generator=generator).tolist():
                codes = _ranked_candidates(objective, beam, row, position, candidates)         # (B, k)
                extended = beam[:, None].repeat(1, codes.shape[1] + 1, 1)                   # (B, k + 1, N)
                extended[:, 1:, position] = codes                                          # slot 0: the member
                extended = torch.unique(extended.flatten(0, 1), dim=0)
                losses = _scores(objective, extended, row, batch_size)
                keep = losses.argsort()[:beam_width]
                beam, beam_loss = extended[keep], losses[keep]
            done += 1
            if float(beam_loss[0]) >= before:  # a local optimum: no single-position change helps any more
                break
        if float(beam_loss[0]) < float(start_loss[row]):  # else the clean codes stay (re-scoring noise aside)
            best_codes[row], best_loss[row] = beam[0], beam_loss[0]
        else:
            best_loss[row] = start_loss[row]
        sweeps_run.append(done)
    changed = (best_codes != start).sum(1).float()
    history = {"start_loss": start_loss.tolist(), "beam_start_loss": beam_start_loss.tolist(),
               "started_from": started_from, "best_loss": best_loss.tolist(),
               "positions_changed": changed.tolist(), "sweeps": sweeps_run}
    return best_codes, history
