"""The gradient jailbreak of Qi et al. (2023): one universal image, optimised by PGD so that the model
answers harmful instructions affirmatively ("Sure, here is ..."), usable without Kedro.

    loss(x) = mean over a batch of (instruction, target) of -log p(target | x, instruction)
            [+ cls_weight * ||h_cls(x) - neutral code||^2      adaptive attacker on Q-MLLM]
    x <- clip(x - step_size * sign(grad loss), x0 - eps, x0 + eps) within [0, 1]

Three ways the gradient reaches the pixels, chosen by the attacker:
- continuous baseline: exact gradient (white-box);
- Q-MLLM as deployed (`straight_through=False`): the image tokens are a codebook lookup at an argmin,
  so the gradient is zero and PGD cannot move (the defense's claim, measured, not assumed);
- Q-MLLM adaptive (`straight_through=True`): BPDA, the quantizers are treated as the identity on the
  backward pass, plus a term that keeps the CLS embedding at a neutral code so the safety map lets it in;
- Q-MLLM surrogate (`continuous_surrogate=True`): the quantizer is the identity on the forward pass too,
  so PGD descends a smooth loss, and only the final check goes through the real, hard-quantized model.

`per_instruction_pgd` is the stronger white-box threat: one image per instruction, crafted for that
instruction alone (the attacker knows the request it will send), every image of a batch optimised together
in one forward pass, each by the gradient of its own loss.

`random_sign_noise` is the control every attack must beat: the same budget spent at random.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from qmllm_pipeline.constants import IGNORE_INDEX, IMAGE_TOKEN
from qmllm_pipeline.models.clip import normalise_pixels, pixel_values
from qmllm_pipeline.models.qmllm import QMLLM
from qmllm_pipeline.models.tokenizer import encode_chat


def first_target_tokens(ids: list[int], labels: list[int], keep: int | None) -> tuple[list[int], list[int]]:
    """Keep the loss on the first `keep` target tokens only (the affirmative opening, "Sure, here is"):
    the tokens that decide whether the model complies or refuses. The sequence is cut after the last kept
    token: a causal LM's loss on those tokens does not depend on what follows, and the attack's forward
    passes no longer carry it. `None` keeps them all."""
    if keep is None:
        return ids, labels
    kept, out, end = 0, [], 0
    for at, label in enumerate(labels):
        kept += label != IGNORE_INDEX
        if label != IGNORE_INDEX and kept <= keep:
            out.append(label)
            end = at + 1
        else:
            out.append(IGNORE_INDEX)
    return ids[:end], out[:end]


def target_sequences(tokenizer, instructions: list[str], targets: list[str], max_length: int,
                     target_tokens: int | None) -> list[tuple[list[int], list[int]]]:
    """(ids, labels) of `<image>\n{instruction}` answered with its affirmative target, the loss on the
    target's first `target_tokens` tokens: what the jailbreak maximises the likelihood of."""
    return [first_target_tokens(*encode_chat(tokenizer, [{"role": "user", "content": f"{IMAGE_TOKEN}\n{instruction}"},
                                                         {"role": "assistant", "content": target}], max_length),
                                target_tokens)
            for instruction, target in zip(instructions, targets, strict=True)]


@torch.no_grad()
def neutral_cls_anchor(model: QMLLM, processor, neutral_codes: list[int], clean: torch.Tensor) -> torch.Tensor:
    """The neutral-labelled CLS code nearest to the clean image's projected CLS: where the adaptive attacker
    keeps its image so the safety map lets it in. `clean` is one image (3, H, W) in [0, 1]."""
    uint8 = (clean[None] * 255).round().to(torch.uint8)
    h_cls = model.encode_images(pixel_values(uint8, processor)).h_cls
    codebook = model.cls_quantizer.codebook.detach()
    codebook = codebook[torch.tensor(neutral_codes, device=codebook.device)]
    return codebook[(codebook - h_cls).pow(2).sum(1).argmin()].clone()


@dataclass
class JailbreakObjective:
    """-log p(target | image, instruction) over a random batch of `sequences` per call (lower is better
    for the attacker). `sequences` are (input_ids, labels) with the `<image>` placeholder in the prompt."""
    model: QMLLM
    processor: object
    sequences: list[tuple[list[int], list[int]]]
    batch_size: int
    straight_through: bool = False
    continuous_surrogate: bool = False       # feed the LLM the unquantized patch tokens (Q-MLLM's continuous twin)
    cls_anchor: torch.Tensor | None = None   # (d_h,) the neutral code to stay at (adaptive attacker)
    cls_weight: float = 0.0
    last: dict = field(default_factory=dict)  # the parts of the last loss, for the history

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        encoding = self.model.encode_images(normalise_pixels(images, self.processor), self.straight_through)
        picks = torch.randperm(len(self.sequences), generator=generator)[: self.batch_size].tolist()
        ids, labels = zip(*(self.sequences[i] for i in picks), strict=True)
        tokens = (encoding.continuous_tokens if self.continuous_surrogate else encoding.image_tokens)
        tokens = tokens.expand(len(picks), -1, -1)
        logits, targets = target_logits(self.model, list(ids), list(labels), tokens)
        nll = F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=IGNORE_INDEX)  # the LLM's own loss
        loss = nll
        if self.cls_anchor is not None and self.cls_weight > 0:
            loss = loss + self.cls_weight * F.mse_loss(encoding.h_cls[0], self.cls_anchor)
        self.last = {"nll": float(nll.detach())}
        if encoding.cls is not None:
            self.last["cls_index"] = int(encoding.cls.indices[0])
        return loss


def universal_pgd(objective: JailbreakObjective, start: torch.Tensor, eps: float | None, steps: int,
                  step_size: float = 1 / 255, seed: int = 0, desc: str | None = "PGD") -> tuple[torch.Tensor, dict]:
    """Signed-gradient descent on one image (3, H, W) in [0, 1]. `eps=None`: unconstrained, starting from
    uniform noise. Returns the image on the 8-bit grid (what an attacker can actually upload) and the
    per-step loss, gradient size and (for Q-MLLM) CLS code. When no gradient reaches the pixels (the
    deployed Q-MLLM) the image cannot move, so PGD stops after that first, measured step."""
    generator = torch.Generator().manual_seed(seed)
    if eps is None:
        start = torch.rand(start.shape, generator=generator)
        lower, upper = torch.zeros_like(start), torch.ones_like(start)
    else:
        lower, upper = (start - eps).clamp(min=0), (start + eps).clamp(max=1)
    image = (start * 255).round() / 255
    history: dict[str, list] = {"loss": [], "grad_abs_mean": [], "cls_index": []}
    for _ in tqdm(range(steps), desc=desc, mininterval=2, disable=desc is None):
        image.requires_grad_(True)
        loss = objective(image[None], generator)
        grad = torch.autograd.grad(loss, image, allow_unused=True)[0] if loss.requires_grad else None
        grad = torch.zeros_like(image) if grad is None else grad  # the deployed Q-MLLM: no path to the pixels
        with torch.no_grad():
            image = torch.minimum(torch.maximum(image - step_size * grad.sign(), lower), upper)
        history["loss"].append(float(loss.detach()))
        history["grad_abs_mean"].append(float(grad.abs().mean()))
        history["cls_index"].append(objective.last.get("cls_index", -1))
        if not grad.any():  # sign(0) = 0: every later step would leave the image where it is
            break
    return ((image.detach() * 255).round() / 255).clamp(0, 1), history


def random_sign_noise(start: torch.Tensor, eps: float | None, seed: int = 0) -> torch.Tensor:
    """The start image (3, H, W) in [0, 1] with every pixel moved by +-eps at random (uniform noise when
    unconstrained, as PGD starts there), on the 8-bit grid: no model, no gradient. An attack image that
    changes the model's behaviour no more than this one has found nothing the budget alone does not."""
    generator = torch.Generator().manual_seed(seed)
    if eps is None:
        noisy = torch.rand(start.shape, generator=generator)
    else:
        signs = torch.randint(0, 2, start.shape, generator=generator).to(start.dtype) * 2 - 1
        noisy = start + eps * signs
    return (noisy.clamp(0, 1) * 255).round() / 255


def target_logits(model: QMLLM, input_ids: list[list[int]], labels: list[list[int]],
                  image_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits (B, T, V) in float32, targets (B, T)): the LLM's next-token logits at each sequence's T target
    positions only, in order, and the tokens they must predict (IGNORE_INDEX where a sequence has fewer).

    The attack's losses read the target's first tokens (`evaluate.jailbreak.target_tokens`, 5) of a sequence
    of 37-49 in the default world, so the vocabulary projection and its log-softmax run on those rows alone
    instead of every position: the decoder body runs as in `llm(...)`, and `lm_head` is applied to the
    gathered hidden states (what a causal LM's forward does to all of them; a test checks the logits against
    the model's own)."""
    batch = model.splice(input_ids, labels, image_tokens)
    hidden = model.llm.get_decoder()(inputs_embeds=batch["inputs_embeds"],
                                     attention_mask=batch["attention_mask"]).last_hidden_state[:, :-1]
    shifted = batch["labels"][:, 1:]                  # hidden[:, t] predicts labels[:, t + 1]
    kept = shifted != IGNORE_INDEX
    counts = kept.sum(1)
    width = max(int(counts.max()), 1)
    order = torch.argsort((~kept).int(), dim=1, stable=True)[:, :width]    # target positions first, in order
    padding = torch.arange(width, device=shifted.device) >= counts[:, None]
    targets = shifted.gather(1, order).masked_fill(padding, IGNORE_INDEX)
    picked = hidden.gather(1, order[..., None].expand(-1, -1, hidden.shape[-1]))
    return model.llm.get_output_embeddings()(picked).float(), targets


def sequence_nll(model: QMLLM, input_ids: list[list[int]], labels: list[list[int]],
                 image_tokens: torch.Tensor) -> torch.Tensor:
    """(B,) each sequence's own mean -log p over its target tokens (the LLM's loss, not averaged over the
    batch): row i's value depends on image row i only, so the gradient of the sum reaches each image from
    its own sequence alone."""
    logits, targets = target_logits(model, input_ids, labels, image_tokens)
    nll = F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="none")
    return nll.sum(1) / (targets != IGNORE_INDEX).sum(1).clamp(min=1)


def refusal_start_ids(tokenizer, phrases: tuple[str, ...]) -> list[int]:
    """The token each refusal phrase opens an answer with ("i'm sorry" -> "I"), tokenised as the assistant's
    first word: what a judge-aware attacker keeps the LLM from saying first."""
    starts = set()
    for phrase in phrases:
        ids, labels = encode_chat(tokenizer, [{"role": "user", "content": "x"},
                                              {"role": "assistant", "content": phrase[:1].upper() + phrase[1:]}], 64)
        starts.add(next(i for i, label in zip(ids, labels, strict=True) if label != IGNORE_INDEX))
    return sorted(starts)


def refusal_logprob(model: QMLLM, input_ids: list[list[int]], labels: list[list[int]], image_tokens: torch.Tensor,
                    refusal_ids: list[int]) -> torch.Tensor:
    """(B,) log p(the answer opens with a refusal token): the log of the summed probability of `refusal_ids` at
    each sequence's first answer position (its first label). Lower is better for an attacker whose success is
    judged as 'not a refusal', whatever the answer then says; row i depends on image row i only."""
    logits, _ = target_logits(model, input_ids, labels, image_tokens)
    return logits[:, 0].log_softmax(-1)[:, refusal_ids].logsumexp(-1)


def attack_term(model: QMLLM, input_ids: list[list[int]], labels: list[list[int]], image_tokens: torch.Tensor,
                refusal_ids: list[int] | None = None, kappa: float | None = None) -> torch.Tensor:
    """(B,) the attacker's main term, lower is better: the target's mean nll (Qi et al.'s objective), or with
    `refusal_ids` log p(opening with a refusal token), or with `kappa` the target's margin."""
    if refusal_ids is not None and kappa is not None:
        raise ValueError("an attack objective is the refusal log-probability or the target margin, not both")
    if refusal_ids is not None:
        return refusal_logprob(model, input_ids, labels, image_tokens, refusal_ids)
    if kappa is not None:
        return target_margin(model, input_ids, labels, image_tokens, kappa)
    return sequence_nll(model, input_ids, labels, image_tokens)


def target_margin(model: QMLLM, input_ids: list[list[int]], labels: list[list[int]], image_tokens: torch.Tensor,
                  kappa: float) -> torch.Tensor:
    """(B,) each sequence's mean over its target tokens of max(best other logit - the target token's logit,
    -kappa): the Carlini-Wagner margin of every target position. It is below zero at every position exactly
    when greedy decoding, fed the target so far, picks each target token: when the answer opens with the
    target. Positions already won by `kappa` stop pulling, so the descent goes to the ones still lost, where
    the mean nll keeps polishing the easy ones. Row i depends on image row i only."""
    logits, targets = target_logits(model, input_ids, labels, image_tokens)
    kept = targets != IGNORE_INDEX
    own = logits.gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    other = logits.scatter(-1, targets.clamp(min=0)[..., None], float("-inf")).amax(-1)
    margins = (other - own).clamp(min=-kappa) * kept
    return margins.sum(1) / kept.sum(1).clamp(min=1)


@dataclass
class PerInstructionObjective:
    """-log p(target_i | image_i, instruction_i) for each image i and its own sequence (lower is better for
    the attacker), plus the adaptive attacker's CLS term per image. The same switches as
    `JailbreakObjective`; `sequences[i]` is the (input_ids, labels) image row i is crafted for. With
    `refusal_ids` the first term is `refusal_logprob` instead (the judge-aware objective: open with anything
    but a refusal); with `kappa` it is `target_margin` (the target's opening won at every position by
    `kappa` logits)."""
    model: QMLLM
    processor: object
    sequences: list[tuple[list[int], list[int]]]
    straight_through: bool = False
    continuous_surrogate: bool = False
    cls_anchor: torch.Tensor | None = None
    cls_weight: float = 0.0
    refusal_ids: list[int] | None = None
    kappa: float | None = None

    def __call__(self, images: torch.Tensor, rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, nll), each (B,), for `images` (B, 3, H, W) crafted for `sequences[rows]`."""
        encoding = self.model.encode_images(normalise_pixels(images, self.processor), self.straight_through)
        tokens = encoding.continuous_tokens if self.continuous_surrogate else encoding.image_tokens
        ids, labels = map(list, zip(*(self.sequences[i] for i in rows), strict=True))
        nll = attack_term(self.model, ids, labels, tokens, self.refusal_ids, self.kappa)
        loss = nll
        if self.cls_anchor is not None and self.cls_weight > 0:
            loss = loss + self.cls_weight * (encoding.h_cls - self.cls_anchor).pow(2).mean(-1)
        return loss.cpu(), nll.cpu()  # the attack's bookkeeping is on the CPU (the gradient flows back through)


def step_sizes(steps: int, step_size: int, schedule: str) -> list[int]:
    """Each PGD step's size in 1/255 (an integer, so the image stays on the 8-bit grid): `constant`, or
    `linear` from `step_size` down to 1."""
    if schedule == "constant":
        return [step_size] * steps
    if schedule == "linear":
        return [max(1, round(step_size * (1 - t / steps))) for t in range(steps)]
    raise ValueError(f"PGD step schedule {schedule!r}: expected 'constant' or 'linear'")


@dataclass
class _Best:
    """Each instruction's best image and its losses over steps and restarts, the step its success test passed
    at (-1: never), and the first restart's mean loss per step."""
    best: torch.Tensor
    best_loss: torch.Tensor
    best_nll: torch.Tensor
    start_loss: torch.Tensor
    last_loss: torch.Tensor
    won_step: torch.Tensor
    mean_loss: list[float]

    @classmethod
    def at(cls, start: torch.Tensor, n: int, steps: int) -> _Best:
        return cls(start.expand(n, -1, -1, -1).clone(), torch.full((n,), float("inf")), torch.full((n,), float("inf")),
                   torch.zeros(n), torch.zeros(n), torch.full((n,), -1), [0.0] * (steps + 1))

    def keep(self, rows: torch.Tensor, x: torch.Tensor, loss: torch.Tensor, nll: torch.Tensor) -> None:
        self.best[rows], self.best_loss[rows], self.best_nll[rows] = x, loss, nll

    def history(self) -> dict:
        return {"loss": self.mean_loss, "start_loss": self.start_loss.tolist(), "best_loss": self.best_loss.tolist(),
                "best_nll": self.best_nll.tolist(), "won_step": self.won_step.tolist()}


@dataclass
class _PerInstructionPGD:
    """One per-instruction PGD run's settings (see `per_instruction_pgd`) and its random stream."""
    objective: PerInstructionObjective
    start: torch.Tensor
    eps: float | None
    steps: int
    sizes: list[int]
    momentum: float
    succeeded: Callable[[torch.Tensor, list[int]], torch.Tensor] | None
    check_every: int
    generator: torch.Generator

    def __post_init__(self):
        if self.eps is None:
            self.lower, self.upper = torch.zeros_like(self.start), torch.ones_like(self.start)
        else:
            self.lower, self.upper = (self.start - self.eps).clamp(min=0), (self.start + self.eps).clamp(max=1)

    def initial(self, restart: int, count: int) -> torch.Tensor:
        """Restart 0 starts at `start`, later ones at a uniform draw within eps (unconstrained: uniform noise)."""
        shape = (count, *self.start.shape)
        if self.eps is None:
            x = torch.rand(shape, generator=self.generator)
        elif restart == 0:
            x = self.start.expand(shape).clone()
        else:
            x = torch.minimum(torch.maximum(self.start + (torch.rand(shape, generator=self.generator) * 2 - 1)
                                            * self.eps, self.lower), self.upper)
        return (x * 255).round() / 255

    def chunk(self, best: _Best, rows: list[int], restart: int, bar) -> None:
        """Descend the images of `rows` not yet won, scoring (and testing) each step, until every one is won or
        the steps are spent."""
        active = torch.tensor([r for r in rows if best.won_step[r] < 0], dtype=torch.long)
        if len(active) == 0:
            bar.update(self.steps)
            return
        x = self.initial(restart, len(active))
        velocity = torch.zeros_like(x)
        n = len(best.best)
        for t in range(self.steps + 1):  # the last pass only scores the final images
            x.requires_grad_(t < self.steps)
            with torch.set_grad_enabled(t < self.steps):
                loss, nll = self.objective(x, active.tolist())
            done = loss.detach()
            better = done < best.best_loss[active]
            best.keep(active[better], x.detach()[better], done[better], nll.detach()[better])
            best.last_loss[active] = done
            if restart == 0:
                best.mean_loss[t] += float(best.last_loss[rows].sum()) / n
                if t == 0:
                    best.start_loss[active] = done
            lost = self._test(best, x, active, done, nll, restart * self.steps + t, t)
            if t == self.steps or not lost.any():
                if restart == 0:  # every image left: the mean stays where they left it
                    for later in range(t + 1, self.steps + 1):
                        best.mean_loss[later] += float(best.last_loss[rows].sum()) / n
                bar.update(self.steps - t)
                return
            x, velocity = self._step(x, loss, velocity, t)
            x, velocity, active = x[lost], velocity[lost], active[lost]
            bar.update()

    def _test(self, best: _Best, x, active, done, nll, step: int, t: int) -> torch.Tensor:
        """The success test at this step, if it is due: images that pass are kept as they are. Returns which are
        still lost."""
        if self.succeeded is None or not (t % self.check_every == 0 or t == self.steps):
            return torch.ones(len(active), dtype=torch.bool)
        with torch.no_grad():
            won = self.succeeded(x.detach(), active.tolist()).bool()
        best.keep(active[won], x.detach()[won], done[won], nll.detach()[won])
        best.won_step[active[won]] = step
        return ~won

    def _step(self, x, loss, velocity, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        grad = torch.autograd.grad(loss.sum(), x, allow_unused=True)[0]
        grad = torch.zeros_like(x) if grad is None else grad
        if self.momentum > 0:
            velocity = self.momentum * velocity + grad / grad.abs().mean((1, 2, 3), keepdim=True).clamp(min=1e-12)
            grad = velocity
        with torch.no_grad():
            x = torch.minimum(torch.maximum(x - self.sizes[t] / 255 * grad.sign(), self.lower), self.upper)
            return (x * 255).round() / 255, velocity


def per_instruction_pgd(objective: PerInstructionObjective, start: torch.Tensor, eps: float | None, steps: int,
                        step_size: int = 1, schedule: str = "constant", restarts: int = 1, batch_size: int = 32,
                        seed: int = 0, momentum: float = 0.0,
                        succeeded: Callable[[torch.Tensor, list[int]], torch.Tensor] | None = None,
                        check_every: int = 10,
                        desc: str | None = "per-instruction PGD") -> tuple[torch.Tensor, dict]:
    """Signed-gradient descent on one image per sequence of `objective`, all starting from `start` (3, H, W)
    in [0, 1] on the 8-bit grid, `batch_size` images per forward pass. Restart 0 starts at `start`, later ones
    at a uniform draw within eps (unconstrained: uniform noise every time); each image keeps the lowest loss
    it reached over steps and restarts. `step_size` is in 1/255; `momentum` > 0 steps along the sign of a
    running sum of L1-normalised gradients (MI-FGSM, Dong et al. 2018) instead of the last gradient's sign.

    `succeeded(images, rows)` -> (B,) bool, when given, is the attacker's own success test (decode and
    judge, as GCG checks its suffixes): it runs on the start image and every `check_every` steps, and an
    image that passes is kept as it is and leaves the batch, so later steps cost only the images still
    lost, and an image that already succeeds is never descended into a refusal of lower loss.

    Returns the images (n, 3, H, W) on the grid and the history: mean loss per step (first restart; an image
    that left the batch keeps its last loss), each instruction's start and best loss and nll, and the step
    (counted over restarts) at which its success test passed (-1: never, or no test)."""
    start = (start * 255).round() / 255
    run = _PerInstructionPGD(objective, start, eps, steps, step_sizes(steps, step_size, schedule), momentum,
                             succeeded, check_every, torch.Generator().manual_seed(seed))
    n = len(objective.sequences)
    best = _Best.at(start, n, steps)
    chunks = [list(range(i, min(i + batch_size, n))) for i in range(0, n, batch_size)]
    bar = tqdm(total=restarts * len(chunks) * steps, desc=desc, mininterval=2, disable=desc is None)
    for restart in range(restarts):
        for rows in chunks:
            run.chunk(best, rows, restart, bar)
    bar.close()
    return best.best.clamp(0, 1), best.history()
