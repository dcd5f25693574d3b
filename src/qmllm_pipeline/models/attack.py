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

`random_sign_noise` is the control every attack must beat: the same budget spent at random.
"""

from __future__ import annotations

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
    the tokens that decide whether the model complies or refuses. `None` keeps them all."""
    if keep is None:
        return ids, labels
    kept, out = 0, []
    for label in labels:
        kept += label != IGNORE_INDEX
        out.append(label if label != IGNORE_INDEX and kept <= keep else IGNORE_INDEX)
    return ids, out


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
    codebook = model.cls_quantizer.codebook.detach()[torch.tensor(neutral_codes)]
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
        nll = self.model(list(ids), list(labels), tokens).loss
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
    per-step loss, gradient size and (for Q-MLLM) CLS code."""
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
