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

With a name head (`models/names.py`) the LLM also reads one pick per name slot, each one of the name
vocabulary's E entries (the empty pick among them), and an image attack can flip those as well as the patch
codes. So the picks are coordinates of the search too (`search_names`): a sequence is N patch codes then
the S slots' picks, and a name position's candidates are ranked by the same first-order gain over the
slot's tokens, summed, g_s . (T[e] - T[pick]) with T[e] entry e's token embeddings. Any entry in any slot
(a colour word in an object slot, an object after an empty one) is allowed: a superset of what the head
can output, so still a bound. `search_names=False` holds the picks at the clean image's.

It is a search, not a proof: a greedy search's best sequence bounds what the image attacks reach from
above only in the sense that it is a strictly stronger attacker; a better search could find more.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from qmllm_pipeline.models.attack import attack_term
from qmllm_pipeline.models.qmllm import QMLLM, ImageEncoding


@dataclass
class CodeObjective:
    """-log p(target_i | codes, instruction_i) of code sequences (B, L) for `sequences[rows]` (lower is better
    for the attacker). Without a name head, or with its tokens held (`name_tokens` (M, d_h), the clean
    image's), a sequence is the N patch codes (L = N). With `name_table` (E, W, d_h), every vocabulary entry's
    W token embeddings, it is the N patch codes then one pick per name slot (L = N + S). `num_patches`: N.
    With `refusal_ids`, log p(the answer opens with a refusal token) instead (`refusal_logprob`); with
    `kappa`, the target's margin (`target_margin`)."""
    model: QMLLM
    sequences: list[tuple[list[int], list[int]]]
    name_tokens: torch.Tensor | None = None
    refusal_ids: list[int] | None = None
    kappa: float | None = None
    name_table: torch.Tensor | None = None
    num_patches: int | None = None

    @classmethod
    def from_encoding(cls, model: QMLLM, sequences: list[tuple[list[int], list[int]]], encoding: ImageEncoding,
                      refusal_ids: list[int] | None = None, kappa: float | None = None,
                      search_names: bool = True) -> tuple[CodeObjective, torch.Tensor]:
        """The objective around one encoded (clean) image, and that image's code sequence: where the search
        starts (its N patch codes, then with a name head and `search_names` its S name picks; without
        `search_names` the name tokens are taken from the image and held fixed)."""
        codes = encoding.patches.indices[0].cpu()  # code sequences live on the CPU; the objective moves them
        names = model.name_tokens_of(encoding.image_tokens[:1], len(codes))
        terms = {"refusal_ids": refusal_ids, "kappa": kappa, "num_patches": len(codes)}
        if names is None:
            return cls(model, sequences, **terms), codes
        if not search_names:
            return cls(model, sequences, name_tokens=names[0], **terms), codes
        return (cls.over_codes(model, sequences, len(codes), refusal_ids, kappa, names.dtype),
                torch.cat([codes, encoding.name_picks[0].to(codes)]))  # .to(codes): onto the CPU too

    @classmethod
    def over_codes(cls, model: QMLLM, sequences: list[tuple[list[int], list[int]]], num_patches: int,
                   refusal_ids: list[int] | None = None, kappa: float | None = None,
                   dtype: torch.dtype | None = None) -> CodeObjective:
        """The objective over whole code sequences, no image needed: the N patch codes and, with a name head,
        one pick per slot (any vocabulary entry, its token embeddings in `dtype`, the LLM's by default)."""
        terms = {"refusal_ids": refusal_ids, "kappa": kappa, "num_patches": num_patches}
        if model.name_head is None:
            return cls(model, sequences, **terms)
        with torch.no_grad():
            table = model.llm.get_input_embeddings()(model.name_head.token_ids)
        return cls(model, sequences, name_table=table if dtype is None else table.to(dtype), **terms)

    def sizes(self, length: int) -> torch.Tensor:
        """(L,) how many values each position of a sequence of `length` may take: P, or E for a name pick."""
        sizes = torch.full((length,), self.model.patch_quantizer.num_codes, dtype=torch.long)
        if self.name_table is not None:
            sizes[self.num_patches:] = len(self.name_table)
        return sizes

    def token_parts(self, codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(patch tokens (B, N, d_h), the name tokens (B, S W, d_h) or None) that code sequences (B, L) give."""
        codes = codes.to(self.model.device)
        if self.name_table is None:
            names = None if self.name_tokens is None else self.name_tokens.expand(len(codes), -1, -1)
            return self.model.patch_quantizer.lookup(codes), names
        patches = self.model.patch_quantizer.lookup(codes[:, :self.num_patches])
        return patches, self.name_table[codes[:, self.num_patches:]].flatten(1, 2)

    def assemble(self, patch_tokens: torch.Tensor, name_tokens: torch.Tensor | None) -> torch.Tensor:
        """What the LLM reads: the patch tokens with the name tokens where the model puts them."""
        if name_tokens is None:
            return patch_tokens
        return self.model._with_names(name_tokens.to(patch_tokens.dtype), patch_tokens)

    def image_tokens(self, codes: torch.Tensor) -> torch.Tensor:
        """What the LLM reads for code sequences (B, L)."""
        return self.assemble(*self.token_parts(codes))

    def __call__(self, codes: torch.Tensor, rows: list[int], tokens: torch.Tensor | None = None) -> torch.Tensor:
        """(B,) each code sequence's own loss; `tokens` replaces the lookup (the gradient's leaf)."""
        ids, labels = map(list, zip(*(self.sequences[i] for i in rows), strict=True))
        tokens = self.image_tokens(codes) if tokens is None else tokens
        return attack_term(self.model, ids, labels, tokens, self.refusal_ids, self.kappa).cpu()


def _scores(objective: CodeObjective, codes: torch.Tensor, row: int, batch_size: int) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([objective(chunk, [row] * len(chunk)) for chunk in codes.split(batch_size)])


def _ranked_candidates(objective: CodeObjective, beam: torch.Tensor, row: int, position: int,
                       candidates: int | None) -> torch.Tensor:
    """(B, k) the values to try at `position` for each beam member (B, L): all of them (P codes, or E name
    entries at a name position), or the k with the largest first-order gain of the loss."""
    is_name = objective.name_table is not None and position >= objective.num_patches
    table = objective.name_table if is_name else objective.model.patch_quantizer.codebook.detach()
    if candidates is None or candidates >= len(table):
        return torch.arange(len(table)).expand(len(beam), -1)
    patch_tokens, name_tokens = (None if t is None else t.detach().requires_grad_(True)
                                 for t in objective.token_parts(beam))
    leaf = name_tokens if is_name else patch_tokens
    with torch.enable_grad():
        loss = objective(beam, [row] * len(beam), objective.assemble(patch_tokens, name_tokens))
        grad = torch.autograd.grad(loss.sum(), leaf)[0]
    if is_name:   # the slot's W tokens move together: the gain summed over them
        width = table.shape[1]
        slot = position - objective.num_patches
        grad = grad[:, slot * width:(slot + 1) * width]                              # (B, W, d_h)
        current = table[beam[:, position].to(table.device)]                           # (B, W, d_h)
        gain = torch.einsum("bwd,ewd->be", grad, table) - (grad * current).sum((1, 2))[:, None]
    else:
        grad = grad[:, position]                                                      # (B, d_h)
        gain = grad @ table.T - (grad * patch_tokens.detach()[:, position]).sum(-1, keepdim=True)
    return gain.topk(candidates, dim=-1, largest=False).indices.cpu()


def code_space_search(objective: CodeObjective, start: torch.Tensor, sweeps: int = 1, beam_width: int = 1,
                      candidates: int | None = None, batch_size: int = 256, seed: int = 0,
                      desc: str | None = "code-space search",
                      starts: list[torch.Tensor] | None = None) -> tuple[torch.Tensor, dict]:
    """Beam coordinate search for each sequence of `objective`, from the clean image's code sequence `start`
    (L,) and, with `starts`, also from `starts[i]` (S_i, L) for sequence i (other code sequences, e.g. those
    the image attacks reached). Returns the best code sequence per sequence (n, L), each position in its range
    (`objective.sizes`: [0, P) for a patch code, [0, E) for a name pick), and the
    history: each sequence's clean-code loss (`start_loss`), the loss of the start it began from
    (`beam_start_loss`; `started_from`: 0 for the clean codes, j for `starts[i][j - 1]`), its best loss, the
    positions changed from the clean codes and the sweeps run."""
    start = start.cpu()  # the search's bookkeeping is on the CPU; the objective moves what it scores
    starts = None if starts is None else [s.cpu() for s in starts]
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


def search_each(objective: CodeObjective, starts: torch.Tensor, sweeps: int = 1, beam_width: int = 1,
                candidates: int | None = None, batch_size: int = 256, seed: int = 0,
                desc: str | None = None) -> tuple[torch.Tensor, dict]:
    """`code_space_search` for each sequence of `objective` from its own start, `starts[i]` (L,) for
    sequence i (e.g. the codes of a different image each), instead of one clean image's for all. Returns the
    best code sequence per sequence (n, L) and each one's start and best loss."""
    if len(starts) != len(objective.sequences):
        raise ValueError(f"code-space search: {len(starts)} starts for {len(objective.sequences)} sequences")
    found, start_loss, best_loss = [], [], []
    for i in tqdm(range(len(starts)), desc=desc, mininterval=2, disable=desc is None):
        codes, history = code_space_search(dataclasses.replace(objective, sequences=[objective.sequences[i]]),
                                           starts[i], sweeps, beam_width, candidates, batch_size, seed + i, desc=None)
        found.append(codes[0])
        start_loss += history["start_loss"]
        best_loss += history["best_loss"]
    return torch.stack(found), {"start_loss": start_loss, "best_loss": best_loss}
