"""Q-MLLM's two training stages, on cached vision features.

Stage 1 (pretrain): vision tower and LLM frozen; train `mm_projector`, `cls_quantizer`, `patch_quantizer`:
    L_pretrain = L_generative + lambda_vq (L_vq_patch + L_vq_cls) + lambda_semantic L_semantic
                 [+ lambda_margin L_margin, beyond the paper, off by default]
L_margin = mean over patch features of relu(margin * s - flip_distance(h)), s the codebook's half spacing:
it pushes each projected patch feature away from the faces of its code's Voronoi cell, so that a small
perturbation of the image (which moves the feature a little) leaves its code, and what the LLM reads, as it is.
The continuous baseline trains its projector with L_generative alone. On the decoupled CLS path,
`train_cls_head` trains `cls_projector` and `cls_quantizer` after stage 1 on
    L_cls = lambda_vq L_vq_cls + lambda_semantic L_semantic
from the cached CLS features alone (no LLM in the loop, so it affords far more samples). Stage 1 itself
either stays the paper's (`paper_stage1_config`: its CLS codebook on `mm_projector` trains and is then
dropped, so the LLM reads the shared path's codes bit for bit) or drops the two CLS terms (`patch_only`).

Stage 2 (finetune): projector and codebooks frozen; the LLM learns from dialogs with the LM loss on the
assistant's tokens only, mixed with text-only replay so that its safety behaviour survives. For Q-MLLM the
LLM's whole input space is known, sequences of P codes, so stage 2 can also show it code sequences no image
need produce: with `code_augment` > 0 that share of the instructions replayed behind an image read
`perturbed_codes` (random codes at a random share of positions, up to all of them) and keep their answer,
a refusal for a harmful request and the answer for a benign one: whatever the codes, the request decides.

A model with a name head (`QMLLMConfig.name_slots`) has it trained first, by `train_name_head` on the cached
features and the scenes' object lists (cross-entropy per slot, no LLM in the loop); both stages then read
it frozen, as they read the vision tower.
"""

from __future__ import annotations

import dataclasses
import logging

import torch
import torch.nn.functional as F

from qmllm_pipeline.constants import IGNORE_INDEX, IMAGE_TOKEN
from qmllm_pipeline.models.checkpoint import TrainingCheckpoint
from qmllm_pipeline.models.code_search import CodeObjective, search_each
from qmllm_pipeline.models.distributed import DistributedSettings, rank_share
from qmllm_pipeline.models.lora import LoraSettings, adapter_files, merged, with_lora
from qmllm_pipeline.models.names import NameHead, name_head_losses
from qmllm_pipeline.models.qmllm import QMLLM, QMLLMConfig
from qmllm_pipeline.models.tokenizer import encode_chat
from qmllm_pipeline.models.training import TrainingConfig, activation_checkpointing, train_loop
from qmllm_pipeline.tracking import StepLogger

logger = logging.getLogger(__name__)

Example = tuple[list[int], list[int], int]  # token ids, labels, feature row (-1: no image)
STAGE1_WITH_HEAD = ("paper", "patch_only")  # a decoupled model's stage 1: the paper's, or without the CLS terms


def paper_stage1_config(config: QMLLMConfig, cls_codes: int) -> QMLLMConfig:
    """The shared-path config a decoupled model's stage 1 trains under when it keeps the paper's CLS terms:
    the same projector and patch codebook, a CLS codebook of `cls_codes` on `mm_projector` (L2, the LLM's
    width). That codebook is a training-only regulariser, so its size is a stage-1 setting, not the head's
    K; `with_stage1_patch_path` keeps the rest."""
    return dataclasses.replace(config, cls_path="shared", cls_vision_width=None, cls_width=None, cls_distance="l2",
                               cls_codes=cls_codes)


def with_stage1_patch_path(model: QMLLM, stage1_model: QMLLM) -> QMLLM:
    """`model` (decoupled, its CLS head untrained) with the trained `mm_projector` and `patch_quantizer` of
    `stage1_model`: everything the LLM reads."""
    model.mm_projector.load_state_dict(stage1_model.mm_projector.state_dict())
    model.patch_quantizer.load_state_dict(stage1_model.patch_quantizer.state_dict())
    return model


def caption_examples(captions: list[str], tokenizer, instruction: str, max_length: int) -> list[Example]:
    """(ids, labels, feature row) per caption: `<image>\\n{instruction}` -> caption, loss on the caption only.
    Row i uses feature row i; repeated captions are encoded once."""
    encoded = {}
    examples = []
    for row, text in enumerate(captions):
        if text not in encoded:
            messages = [{"role": "user", "content": f"{IMAGE_TOKEN}\n{instruction}"},
                        {"role": "assistant", "content": text}]
            encoded[text] = encode_chat(tokenizer, messages, max_length)
            if all(label == IGNORE_INDEX for label in encoded[text][1]):
                raise ValueError(f"caption row {row}: no caption token within max_length {max_length} (the prompt "
                                 "alone is longer; a real LLM's conversation format needs more: pretrain.max_length)")
        ids, labels = encoded[text]
        examples.append((ids, labels, row))
    return examples


def stage1_losses(model: QMLLM, cls_features: torch.Tensor, patch_features: torch.Tensor,
                  examples: list[Example], semantic_targets: torch.Tensor | None = None, lambda_vq: float = 1.0,
                  lambda_semantic: float = 0.0, name_features: torch.Tensor | None = None,
                  lambda_margin: float = 0.0, margin: float = 0.5) -> dict[str, torch.Tensor]:
    """One stage-1 batch: the examples' caption loss given their (cached) image features, plus for Q-MLLM
    both VQ losses and L_semantic against the targets of the same feature rows, and with `lambda_margin` > 0
    the patch margin term (`margin`: the flip distance asked for, as a share of the codebook's half
    spacing; the mean flip distance is reported either way, as `patch_flip_distance`, in that unit). `loss`
    is the total. `name_features`: the name head's CLS feature, by row (None: the captions are read without
    name tokens)."""
    rows = torch.tensor([example[2] for example in examples])
    device = next(model.mm_projector.parameters()).device
    encoding = model.encode_features(cls_features[rows].float().to(device), patch_features[rows].float().to(device),
                                     with_cls=not model.decoupled, name_features=_rows(name_features, rows, device),
                                     with_names=name_features is not None)
    generative = model([e[0] for e in examples], [e[1] for e in examples], encoding.image_tokens).loss
    losses = {"generative": generative}
    total = generative
    if model.quantized:
        flips = model.patch_quantizer.flip_distance(encoding.patch_hidden, relative=True)
        losses["patch_flip_distance"] = flips.detach().mean()
        if lambda_margin > 0:
            losses["margin"] = F.relu(margin - flips).mean()
            total = total + lambda_margin * losses["margin"]
    if model.quantized and encoding.cls is None:  # decoupled: the CLS head trains apart
        losses["vq_patch"] = encoding.patches.loss
        total = total + lambda_vq * encoding.patches.loss
        losses["patch_indices"] = encoding.patches.indices
    elif model.quantized:
        losses.update(vq_patch=encoding.patches.loss, vq_cls=encoding.cls.loss)
        total = total + lambda_vq * (encoding.patches.loss + encoding.cls.loss)
        if semantic_targets is not None and lambda_semantic > 0:
            semantic = F.mse_loss(encoding.cls.quantized, semantic_targets[rows].float().to(device))
            losses["semantic"] = semantic
            total = total + lambda_semantic * semantic
        losses["cls_indices"], losses["patch_indices"] = encoding.cls.indices, encoding.patches.indices
    losses["loss"] = total
    return losses


def pretrain(model: QMLLM, cls_features: torch.Tensor, patch_features: torch.Tensor, examples: list[Example],
             semantic_targets: torch.Tensor | None, training: TrainingConfig, seed: int, lambda_vq: float = 1.0,
             lambda_semantic: float = 1.0, usage_every: int = 100, step_logger: StepLogger | None = None,
             checkpoint: TrainingCheckpoint | None = None, name_features: torch.Tensor | None = None,
             lambda_margin: float = 0.0, margin: float = 0.5, distributed: DistributedSettings | None = None,
             gradient_checkpointing: bool = False) -> QMLLM:
    """Stage 1 on (image features, caption) pairs; `examples[i]` uses feature row `examples[i][2]`. Every
    `usage_every` steps the codebooks' usage and perplexity over those steps are logged. A name head, if the
    model has one, is read frozen (`name_features`: its CLS feature by row), or not at all (None).
    `distributed`: the processes and strategy the loop runs under (None: plain PyTorch, one process);
    `gradient_checkpointing`: the frozen LLM recomputes its activations in the backward pass instead of
    keeping them (memory for time; the gradient reaching the projector is the same)."""
    model.llm.requires_grad_(False)
    if model.name_head is not None:
        model.name_head.requires_grad_(False).eval()
    trainable = {"mm_projector": model.mm_projector}
    quantizers = {}
    if model.quantized:
        quantizers = {"patch": model.patch_quantizer} if model.decoupled else {"cls": model.cls_quantizer,
                                                                               "patch": model.patch_quantizer}
        trainable.update({f"{name}_quantizer": quantizer for name, quantizer in quantizers.items()})
    seen = {name: [] for name in quantizers}
    steps_done = [0]

    def step(generator: torch.Generator) -> dict[str, torch.Tensor]:
        picks = torch.randint(len(examples), (training.batch_size,), generator=generator).tolist()
        picks, _ = rank_share(picks, generator)  # this process's share (all of it with one process)
        losses = stage1_losses(model, cls_features, patch_features, [examples[i] for i in picks],
                               semantic_targets, lambda_vq, lambda_semantic, name_features, lambda_margin, margin)
        for name in quantizers:
            seen[name].append(losses.pop(f"{name}_indices").flatten())
        steps_done[0] += 1
        if quantizers and steps_done[0] % usage_every == 0:  # codebook health over the last steps
            for name, quantizer in quantizers.items():
                stats = quantizer.usage_stats(torch.cat(seen[name]))
                losses[f"{name}_codes_used"] = torch.tensor(float(stats["codes_used"]))
                losses[f"{name}_perplexity"] = torch.tensor(stats["perplexity"])
                seen[name].clear()
        losses["loss"] = losses.pop("loss")  # the total last, as logged before
        return losses

    if gradient_checkpointing:  # transformers checkpoints only in training mode (the LLM's dropout, if any, too)
        activation_checkpointing(model.llm, True)
        model.llm.train()
    train_loop(trainable, step, training, seed, step_logger, checkpoint,
               desc=f"pretrain {model.config.variant}", distributed=distributed, carry=(model,))
    if gradient_checkpointing:
        activation_checkpointing(model.llm, False)
        model.llm.eval()
    return model


def cls_head_losses(model: QMLLM, cls_features: torch.Tensor, semantic_targets: torch.Tensor,
                    lambda_vq: float = 1.0, lambda_semantic: float = 1.0) -> dict[str, torch.Tensor]:
    """One batch of the decoupled CLS head: L_vq_cls and L_semantic (MSE from the code to the target, on the
    unit sphere for the cosine distance); `loss` is the total."""
    encoding = model.cls_quantizer(model.cls_head(cls_features.float()))
    targets = semantic_targets.float()
    if model.config.cls_distance == "cosine":
        targets = F.normalize(targets, dim=-1)
    semantic = F.mse_loss(encoding.quantized, targets)
    return {"vq_cls": encoding.loss, "semantic": semantic, "cls_indices": encoding.indices,
            "loss": lambda_vq * encoding.loss + lambda_semantic * semantic}


def train_cls_head(model: QMLLM, cls_features: torch.Tensor, semantic_targets: torch.Tensor,
                   training: TrainingConfig, seed: int, lambda_vq: float = 1.0, lambda_semantic: float = 1.0,
                   usage_every: int = 100, step_logger: StepLogger | None = None,
                   checkpoint: TrainingCheckpoint | None = None) -> QMLLM:
    """The decoupled CLS path: `cls_projector` and `cls_quantizer` on cached CLS features and their semantic
    targets (row i with row i), nothing else in the loop; everything the LLM reads stays as it is."""
    if not model.decoupled:
        raise ValueError("train_cls_head trains the decoupled CLS path; this model shares mm_projector")
    seen = []

    def step(generator: torch.Generator) -> dict[str, torch.Tensor]:
        rows = torch.randint(len(cls_features), (training.batch_size,), generator=generator)
        losses = cls_head_losses(model, cls_features[rows], semantic_targets[rows], lambda_vq, lambda_semantic)
        seen.append(losses.pop("cls_indices"))
        if len(seen) == usage_every:
            stats = model.cls_quantizer.usage_stats(torch.cat(seen))
            losses["cls_codes_used"] = torch.tensor(float(stats["codes_used"]))
            losses["cls_perplexity"] = torch.tensor(stats["perplexity"])
            seen.clear()
        losses["loss"] = losses.pop("loss")
        return losses

    train_loop({"cls_projector": model.cls_projector, "cls_quantizer": model.cls_quantizer}, step, training, seed,
               step_logger, checkpoint, desc=f"CLS head {model.config.variant}")
    return model


def train_name_head(head: NameHead, cls_features: torch.Tensor, patch_features: torch.Tensor,
                    targets: torch.Tensor, training: TrainingConfig, seed: int,
                    step_logger: StepLogger | None = None, checkpoint: TrainingCheckpoint | None = None) -> NameHead:
    """The name head on cached features (row i with row i): `targets` (rows, slots) are each scene's objects in
    reading order as vocabulary indices, then the empty entry (`names.slot_targets`)."""
    def step(generator: torch.Generator) -> dict[str, torch.Tensor]:
        rows = torch.randint(len(cls_features), (training.batch_size,), generator=generator)
        return name_head_losses(head, cls_features[rows], patch_features[rows], targets[rows])

    train_loop({"name_head": head}, step, training, seed, step_logger, checkpoint, desc="name head")
    return head


def _rows(features: torch.Tensor | None, rows, device: torch.device | None = None) -> torch.Tensor | None:
    return None if features is None else features[rows].float().to(device)


def perturbed_codes(codes: torch.Tensor, max_share: float, num_codes: int,
                    generator: torch.Generator) -> torch.Tensor:
    """Code sequences (B, N) with, in each row, every position replaced by a uniform random code with
    probability s, s drawn per row from U(0, `max_share`): from a few flipped codes (what an eps-bounded
    perturbation does to an image) to a wholly random sequence (`max_share` 1)."""
    share = torch.rand((len(codes), 1), generator=generator) * max_share
    replace = torch.rand(codes.shape, generator=generator) < share
    return torch.where(replace, torch.randint(num_codes, codes.shape, generator=generator), codes)


def _with_patch_codes(model: QMLLM, image_tokens: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """`image_tokens` (B, M + N, d_h) with their N patch tokens replaced by the codebook rows of `codes`
    (B, N); a name head's M tokens stay where they are."""
    patches = model.patch_quantizer.lookup(codes).to(image_tokens.dtype)
    names = model.name_tokens_of(image_tokens, codes.shape[1])
    return patches if names is None else model._with_names(names, patches)


def _with_name_picks(model: QMLLM, image_tokens: torch.Tensor, picks: torch.Tensor) -> torch.Tensor:
    """`image_tokens` (B, M + N, d_h) with their M name tokens replaced by those of `picks` (B, slots); the N
    patch tokens stay where they are."""
    names = model.name_head.lookup(picks, model.llm.get_input_embeddings()).to(image_tokens.dtype)
    return model._with_names(names, model.patch_tokens_of(image_tokens, names.shape[1]))


@dataclasses.dataclass(frozen=True)
class SearchAugment:
    """Stage 2's adversarial training in code space (Q-MLLM only): at each step of `rounds`, the code-space
    search (`models/code_search.py`) runs against the LLM as trained so far, for `instructions` of the
    training harmful `sequences` (each with its affirmative target, drawn afresh each round), each from the
    codes of a random dialog image; the sequences it finds join a pool, and from then on each instruction
    replayed behind an image reads a pool sequence instead of its image's codes with probability `fraction`,
    keeping its answer (a refusal for a harmful request, the answer for a benign one). The search is the
    evaluation's (greedy, `candidates` ranked by the first-order gain, `sweeps` passes over the positions,
    patch codes and name picks alike), so stage 2 learns to refuse what the strongest attacker reaches."""
    sequences: list[tuple[list[int], list[int]]]
    fraction: float
    rounds: tuple[int, ...]
    instructions: int
    candidates: int | None = 16
    sweeps: int = 1
    batch_size: int = 256

    def rounds_within(self, steps: int) -> tuple[int, ...]:
        """The rounds a stage 2 of `steps` steps runs, after checking the settings; a round past the last step
        (a shortened run) is left out with a warning."""
        if not 0 <= self.fraction <= 1:
            raise ValueError(f"search_augment fraction {self.fraction}: expected a probability in [0, 1]")
        if not self.rounds or any(r < 1 for r in self.rounds):
            raise ValueError(f"search_augment rounds {list(self.rounds)}: expected steps from 1 on")
        if self.instructions < 1 or not self.sequences:
            raise ValueError(f"search_augment: {self.instructions} instructions of {len(self.sequences)} to search")
        kept = tuple(r for r in self.rounds if r <= steps)
        if len(kept) < len(self.rounds) and self.fraction > 0:
            logger.warning("search_augment rounds %s are past stage 2's last step (%d) and do not run",
                           [r for r in self.rounds if r > steps], steps)
        return kept


class FoundCodes(torch.nn.Module):
    """The pool of code sequences the stage-2 search found, and the step count, as buffers: a training
    checkpoint carries them with the weights, so a resumed run reads the same pool at the same step."""

    def __init__(self, capacity: int, length: int):
        super().__init__()
        self.register_buffer("codes", torch.zeros((capacity, length), dtype=torch.long))
        self.register_buffer("size", torch.zeros(1, dtype=torch.long))
        self.register_buffer("step", torch.zeros(1, dtype=torch.long))

    def add(self, codes: torch.Tensor) -> None:
        first = int(self.size[0])
        self.codes[first:first + len(codes)] = codes
        self.size += len(codes)


def _search_round(model: QMLLM, search: SearchAugment, pool: FoundCodes, cls_features: torch.Tensor,
                  patch_features: torch.Tensor, name_features: torch.Tensor | None, seed: int, at: int) -> None:
    """One round of `SearchAugment`: search for a fresh draw of instructions against the model as it is at
    step `at`, each from a random dialog image's codes, and add what it finds to `pool`."""
    draw = torch.Generator().manual_seed(seed * 100_003 + at)   # its own stream: the loop's is left as it is
    which = torch.randperm(len(search.sequences), generator=draw)[:search.instructions].tolist()
    rows = torch.randint(len(cls_features), (len(which),), generator=draw)
    training = model.llm.training
    model.llm.eval()
    device = next(model.mm_projector.parameters()).device
    with torch.no_grad():
        encoding = model.encode_features(cls_features[rows].float().to(device), patch_features[rows].float().to(device),
                                         with_cls=False, name_features=_rows(name_features, rows, device))
    starts = encoding.patches.indices
    if encoding.name_picks is not None:
        starts = torch.cat([starts, encoding.name_picks.to(starts)], 1)
    objective = CodeObjective.over_codes(model, [search.sequences[i] for i in which], encoding.patches.indices.shape[1])
    found, history = search_each(objective, starts, search.sweeps, 1, search.candidates, search.batch_size,
                                 seed=seed + at, desc=f"stage-2 code search, step {at}")
    model.llm.train(training)
    pool.add(found)
    logger.info("stage-2 code search at step %d: %d training instructions, target loss %.3f -> %.3f, %.1f of %d "
                "positions changed; %d sequences in the pool", at, len(which),
                sum(history["start_loss"]) / len(which), sum(history["best_loss"]) / len(which),
                float((found != starts).sum(1).float().mean()), starts.shape[1], int(pool.size[0]))


def _with_found_codes(model: QMLLM, image_tokens: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """`image_tokens` (B, M + N, d_h) of whole code sequences (B, L): their N patch codes, then (with a name
    head) their S name picks."""
    patches = codes.shape[1] - (model.name_head.slots if model.name_head is not None else 0)
    tokens = _with_patch_codes(model, image_tokens, codes[:, :patches])
    return tokens if model.name_head is None else _with_name_picks(model, tokens, codes[:, patches:])


def finetune(model: QMLLM, cls_features: torch.Tensor, patch_features: torch.Tensor, examples: list[Example],
             training: TrainingConfig, seed: int, step_logger: StepLogger | None = None,
             checkpoint: TrainingCheckpoint | None = None, teacher: torch.nn.Module | None = None,
             distill_weight: float = 0.0, image_prefix: list[int] | None = None,
             name_features: torch.Tensor | None = None, code_augment: float = 0.0,
             code_augment_share: float = 1.0, name_augment: float = 0.0, name_augment_share: float = 1.0,
             search_augment: SearchAugment | None = None, lora: LoraSettings | None = None,
             distributed: DistributedSettings | None = None, gradient_checkpointing: bool = False,
             adapter_sink: dict | None = None) -> QMLLM:
    """Stage 2: train the LLM on dialogs (image rows >= 0) and text-only replay (row -1).

    The first `len(cls_features)` examples are the dialogs (example i reads feature row i); the rest replay
    training instructions, as text or behind a dialog image. With a `teacher` (the foundation LLM, frozen) and
    `distill_weight` > 0, each replayed instruction in a batch also pays `distill_weight` times the KL
    divergence from the teacher's next-token distributions over the answer, the teacher reading the
    instruction as text: an image in the context should not change how the model answers or refuses a
    request. No labels are needed beyond the replayed answer the tokens are read along. The teacher must read
    the request exactly as it was trained to: `image_prefix` is what the placeholder brings into the prompt
    (the ids of `<image>\n`), all of it removed (`text_only`); a stray newline alone makes it refuse benign
    requests. A name head, if the model has one, is read frozen (`name_features`: its CLS feature by row).
    `code_augment` (Q-MLLM only; the continuous baseline has no codes): the probability that a replayed
    instruction behind an image reads `perturbed_codes` of its image's codes (up to `code_augment_share` of
    the positions) instead; drawn afresh at every step, from the loop's generator. `name_augment` (Q-MLLM with a
    name head only): the same for the name head's picks, each slot's pick replaced by any vocabulary entry (the
    empty one included) with probability s ~ U(0, `name_augment_share`), the picks the code-space search found
    jailbreaks among (`models/code_search.py`); drawn after the codes'. `search_augment` (Q-MLLM only, off at
    fraction 0): adversarial training in code space, `SearchAugment`; its per-step draws come after the names'.
    With `lora` the LLM's
    weights stay frozen and adapters train (`models/lora.py`); the returned model's LLM has them merged.
    `adapter_sink`, with LoRA: filled with the trained adapters alone (`lora.adapter_files`) before they are
    merged. `distributed` and `gradient_checkpointing` as for `pretrain`."""
    for frozen in (model.mm_projector, model.cls_projector, model.cls_quantizer, model.patch_quantizer,
                   model.name_head):
        if frozen is not None:
            frozen.requires_grad_(False).eval()
    if lora is None:
        model.llm.requires_grad_(True)
    else:
        model.llm = with_lora(model.llm, lora)  # the base frozen, the adapters trainable
    distill = teacher is not None and distill_weight > 0
    if distill:
        if not image_prefix:
            raise ValueError("distillation needs image_prefix, the ids `<image>\\n` brings into a prompt")
        teacher.requires_grad_(False).eval()
    n_dialogs = len(cls_features)
    for name, fraction, share in (("code_augment", code_augment, code_augment_share),
                                  ("name_augment", name_augment, name_augment_share)):
        if not 0 <= fraction <= 1 or not 0 < share <= 1:
            raise ValueError(f"{name} {fraction} and {name}_share {share}: expected a probability in [0, 1] and "
                             "a share in (0, 1]")
    augment = code_augment > 0 and model.quantized  # no draw otherwise: the paper's stage 2 stays bit for bit
    augment_names = name_augment > 0 and model.quantized and model.name_head is not None
    rounds = () if search_augment is None else search_augment.rounds_within(training.steps)
    searching = search_augment is not None and search_augment.fraction > 0 and model.quantized and bool(rounds)
    modules: dict[str, torch.nn.Module] = {"llm": model.llm}
    if searching:
        with torch.no_grad():   # the patch tokens' count N, after any pooling
            patches = model.encode_features(cls_features[:1].float(), patch_features[:1].float(),
                                            with_cls=False, with_names=False).patches.indices.shape[1]
        length = patches + (model.name_head.slots if model.name_head is not None else 0)
        pool = modules["found_codes"] = FoundCodes(len(rounds) * search_augment.instructions, length)

    def step(generator: torch.Generator) -> dict[str, torch.Tensor]:
        if searching:
            pool.step += 1
            if int(pool.step[0]) in rounds:
                _search_round(model, search_augment, pool, cls_features, patch_features, name_features, seed,
                              int(pool.step[0]))
        picks = torch.randint(len(examples), (training.batch_size,), generator=generator).tolist()
        picks, generator = rank_share(picks, generator)  # this process's share (all of it with one process)
        imaged = [i for i in picks if examples[i][2] >= 0]  # image tokens are spliced in this order
        rows = [examples[i][2] for i in imaged]
        image_tokens = None
        if rows:
            device = next(model.mm_projector.parameters()).device
            with torch.no_grad():
                encoding = model.encode_features(cls_features[rows].float().to(device),
                                                 patch_features[rows].float().to(device), with_cls=False,
                                                 name_features=_rows(name_features, rows, device))
                image_tokens = encoding.image_tokens
                replayed = torch.tensor([i >= n_dialogs for i in imaged])
                if augment:
                    chosen = replayed & (torch.rand(len(imaged), generator=generator) < code_augment)
                    codes = encoding.patches.indices
                    moved = perturbed_codes(codes, code_augment_share, model.patch_quantizer.num_codes, generator)
                    image_tokens = _with_patch_codes(model, image_tokens, torch.where(chosen[:, None], moved, codes))
                if augment_names:
                    chosen = replayed & (torch.rand(len(imaged), generator=generator) < name_augment)
                    named = encoding.name_picks
                    moved = perturbed_codes(named, name_augment_share, model.name_head.names + 1, generator)
                    image_tokens = _with_name_picks(model, image_tokens, torch.where(chosen[:, None], moved, named))
                if searching:
                    chosen = replayed & (torch.rand(len(imaged), generator=generator) < search_augment.fraction)
                    entries = torch.randint(max(int(pool.size[0]), 1), (len(imaged),), generator=generator)
                    if int(pool.size[0]) and chosen.any():
                        image_tokens = image_tokens.clone()
                        image_tokens[chosen] = _with_found_codes(model, image_tokens[chosen],
                                                                 pool.codes[entries[chosen]])
        ids, labels = [examples[i][0] for i in picks], [examples[i][1] for i in picks]
        if not distill:
            return {"loss": model(ids, labels, image_tokens).loss}
        batch = model.splice(ids, labels, image_tokens)
        out = model.llm(inputs_embeds=batch["inputs_embeds"], attention_mask=batch["attention_mask"],
                        labels=batch["labels"])
        replayed = [k for k, i in enumerate(picks) if i >= n_dialogs]
        if not replayed:
            kl = out.loss.new_zeros(())
        else:
            texts = [text_only(ids[k], labels[k], image_prefix) for k in replayed]
            kl = answer_kl(out.logits[replayed], batch["labels"][replayed], teacher, [t[0] for t in texts],
                           [t[1] for t in texts])
        return {"lm": out.loss, "distill": kl, "loss": out.loss + distill_weight * kl}

    if gradient_checkpointing:
        activation_checkpointing(model.llm, True)
    train_loop(modules, step, training, seed, step_logger, checkpoint,
               desc=f"finetune {model.config.variant}", distributed=distributed,
               carry=(model,) if teacher is None else (model, teacher))
    if gradient_checkpointing:
        activation_checkpointing(model.llm, False)
    if adapter_sink is not None:
        adapter_sink.update(adapter_files(model.llm))
    model.llm = merged(model.llm)
    return model


def text_only(ids: list[int], labels: list[int], image_prefix: list[int]) -> tuple[list[int], list[int]]:
    """A sequence without its image placeholder: `image_prefix` (e.g. the ids of `<image>\n`) removed where
    it starts, with its labels; a sequence without it is returned as it is."""
    width = len(image_prefix)
    for at in range(len(ids) - width + 1):
        if ids[at:at + width] == image_prefix:
            return ids[:at] + ids[at + width:], labels[:at] + labels[at + width:]
    return ids, labels


def answer_kl(student_logits: torch.Tensor, student_labels: torch.Tensor, teacher: torch.nn.Module,
              teacher_ids: list[list[int]], teacher_labels: list[list[int]]) -> torch.Tensor:
    """Mean KL(teacher || student) over the answer tokens (labels != IGNORE_INDEX), position by position.

    Student and teacher read different prefixes (the student's may hold image tokens), so each side's
    answer positions are gathered by its own labels: sequence by sequence they are the same tokens in the
    same order. Sequences are right-padded; `student_logits` (B, T, V) are a causal LM's for its labels."""
    longest = max(len(t) for t in teacher_ids)
    input_ids = torch.zeros((len(teacher_ids), longest), dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    target = torch.full_like(input_ids, IGNORE_INDEX)
    for k, (row_ids, row_labels) in enumerate(zip(teacher_ids, teacher_labels, strict=True)):
        input_ids[k, :len(row_ids)] = torch.tensor(row_ids)
        mask[k, :len(row_ids)] = 1
        target[k, :len(row_labels)] = torch.tensor(row_labels)
    with torch.no_grad():
        teacher_logits = teacher(input_ids=input_ids, attention_mask=mask).logits
    student = student_logits[:, :-1][student_labels[:, 1:] != IGNORE_INDEX]
    taught = teacher_logits[:, :-1][target[:, 1:] != IGNORE_INDEX]
    if student.shape != taught.shape:
        raise ValueError(f"{student.shape[0]} student answer tokens against {taught.shape[0]} for the teacher")
    return F.kl_div(F.log_softmax(student.float(), -1), F.log_softmax(taught.float(), -1), log_target=True,
                    reduction="batchmean")


@torch.no_grad()
def code_indices(model: QMLLM, cls_features: torch.Tensor, patch_features: torch.Tensor,
                 batch_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """cls_index (N,) and patch_indices (N, P) for cached features, in eval mode (no codebook updates)."""
    model.eval()
    cls_out, patch_out = [], []
    for start in range(0, len(cls_features), batch_size):
        encoding = model.encode_features(cls_features[start:start + batch_size].float(),
                                         patch_features[start:start + batch_size].float(), with_names=False)
        cls_out.append(encoding.cls.indices)
        patch_out.append(encoding.patches.indices)
    return torch.cat(cls_out), torch.cat(patch_out)
