"""Stage 2 (finetune) on cached vision features: projector, codebooks and heads frozen; the LLM learns from
dialogs with the LM loss on the assistant's tokens only (docs/method.md, "Training").

One step draws a batch of examples: dialogs (each reads its image's feature row) and replayed training
instructions (as text, or behind a random dialog image), then

    batch   = the examples, and what the LLM reads for their images (`Stage2Batch`)
    augment = each augmentation may change the image tokens of the replayed instructions behind an image
              (`SearchAugmentation`: adversarial training in code space, Q-MLLM only)
    loss    = the LM loss [+ distill_weight KL(foundation LLM reading the request as text || the model)]

Replay itself is data (`Stage2Data.examples` past the dialogs); distillation (`Distillation`) and the
code-space search are the objects below. With LoRA the LLM's weights stay frozen and adapters train
(`models/lora.py`); the returned LLM has them merged, and the adapters alone are returned beside it.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from qmllm_pipeline.constants import IGNORE_INDEX
from qmllm_pipeline.models.checkpoint import TrainingCheckpoint
from qmllm_pipeline.models.code_search import CodeObjective, search_each
from qmllm_pipeline.models.distributed import DistributedSettings, rank_share
from qmllm_pipeline.models.feature_shards import modules_of
from qmllm_pipeline.models.lora import LoraSettings, adapter_files, mark_adapted, merged, with_lora
from qmllm_pipeline.models.qmllm import QMLLM
from qmllm_pipeline.models.stage1 import Example
from qmllm_pipeline.models.training import TrainingConfig, activation_checkpointing, train_loop
from qmllm_pipeline.tracking import StepLogger

logger = logging.getLogger(__name__)
Sequence = tuple[list[int], list[int]]   # token ids and labels of `<image>` + instruction + affirmative target


@dataclass(frozen=True)
class SearchAugmentSettings:
    """`finetune.stage2.search_augment`: at each step of `rounds` the code-space search (the evaluation's,
    greedy, `candidates` ranked by the first-order gain, `sweeps` passes) attacks the LLM as trained so far
    for `instructions` training harmful instructions; from then on an instruction replayed behind an image
    reads what it found with probability `fraction` (0: off, no search). The searched sequences are cut
    after the target's first `target_tokens` tokens, at most `max_length` tokens."""
    fraction: float = 0.0
    rounds: tuple[int, ...] = ()
    instructions: int = 64
    candidates: int | None = 16
    sweeps: int = 1
    batch_size: int = 256
    max_length: int = 96
    target_tokens: int | None = 5


@dataclass(frozen=True)
class LoraSpec(LoraSettings):
    """`finetune.stage2.lora`: LoRA instead of full fine-tuning when `enabled`."""
    enabled: bool = False


@dataclass(frozen=True)
class Stage2Settings:
    """`finetune.stage2`."""
    training: TrainingConfig
    log_every: int = 25
    gradient_checkpointing: bool = False
    distill_weight: float = 0.0
    search_augment: SearchAugmentSettings = field(default_factory=SearchAugmentSettings)
    lora: LoraSpec = field(default_factory=LoraSpec)
    image_input: Literal["features", "codes"] = "features"


@dataclass(frozen=True)
class Stage2Data:
    """Stage 2's training set: the dialog images' cached features (row i: dialog i), the examples (the first
    `len(cls)` are the dialogs, example i reading row i; the rest replay training instructions, row -1 as text
    or a dialog image's row), `image_prefix` (the ids `<image>\\n` brings into a prompt, which the teacher of
    `Distillation` must not read) and the training harmful instructions' `search_sequences` (for
    `SearchAugmentation`)."""
    cls: torch.Tensor
    patches: torch.Tensor
    examples: list[Example]
    head_cls: torch.Tensor | None = None
    image_prefix: list[int] = field(default_factory=list)
    search_sequences: list[Sequence] = field(default_factory=list)
    codes: torch.Tensor | None = None

    @property
    def dialogs(self) -> int:
        return len(self.cls)


@torch.no_grad()
def patch_codes(model: QMLLM, data: Stage2Data, batch_size: int = 256) -> torch.Tensor:
    """Each dialog image's patch codes (N, P), int16 where the codebook allows, in one pass over the features
    (`image_input: codes`). Stage 2 freezes the projector and the codebook, so these are the codes every batch
    would compute; the LLM then reads their codebook rows, as the deployed model does. N x P small integers
    (576 x 2 bytes an image at LLaVA-1.5's size) instead of the features or a tower pass per batch."""
    device = next(model.mm_projector.parameters()).device
    codes = []
    for start in tqdm(range(0, data.dialogs, batch_size), desc="stage-2 patch codes", unit="batch", mininterval=2):
        rows = torch.arange(start, min(start + batch_size, data.dialogs))
        encoding = model.encode_features(data.cls[rows].float().to(device), data.patches[rows].float().to(device),
                                         with_cls=False, with_names=False)
        codes.append(encoding.patches.indices.cpu())
    dtype = torch.int16 if model.patch_quantizer.num_codes <= torch.iinfo(torch.int16).max else torch.int32
    return torch.cat(codes).to(dtype)


@dataclass
class Stage2Batch:
    """One step's examples: their token ids and labels, which of them read an image (`imaged`, in the order
    the image tokens are spliced in), which of those are replayed instructions, and the image tokens."""
    picks: list[int]
    ids: list[list[int]]
    labels: list[list[int]]
    imaged: list[int]
    replayed: torch.Tensor | None = None
    image_tokens: torch.Tensor | None = None


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


def rounds_within(settings: SearchAugmentSettings, sequences: list[Sequence], steps: int) -> tuple[int, ...]:
    """The search rounds a stage 2 of `steps` steps runs, after checking the settings; a round past the last
    step (a shortened run) is left out with a warning."""
    if not 0 <= settings.fraction <= 1:
        raise ValueError(f"search_augment fraction {settings.fraction}: expected a probability in [0, 1]")
    if settings.fraction == 0:
        return ()
    if not settings.rounds or any(r < 1 for r in settings.rounds):
        raise ValueError(f"search_augment rounds {list(settings.rounds)}: expected steps from 1 on")
    if settings.instructions < 1 or not sequences:
        raise ValueError(f"search_augment: {settings.instructions} instructions of {len(sequences)} to search")
    kept = tuple(r for r in settings.rounds if r <= steps)
    if len(kept) < len(settings.rounds):
        logger.warning("search_augment rounds %s are past stage 2's last step (%d) and do not run",
                       [r for r in settings.rounds if r > steps], steps)
    return kept


class SearchAugmentation:
    """Adversarial training in code space (Q-MLLM only): at each step of the rounds, the code-space search
    (`models/code_search.py`) runs against the LLM as trained so far, for a fresh draw of the training harmful
    instructions, each from the codes of a random dialog image; what it finds joins `pool`, and each
    instruction replayed behind an image then reads a pool sequence instead of its image's codes with
    probability `fraction`, keeping its answer: whatever the codes, the request decides."""

    def __init__(self, model: QMLLM, data: Stage2Data, settings: SearchAugmentSettings, rounds: tuple[int, ...],
                 seed: int):
        self.model, self.data, self.settings, self.rounds, self.seed = model, data, settings, rounds, seed
        if data.codes is not None:
            patches = data.codes.shape[1]
        else:
            with torch.no_grad():   # the patch tokens' count N, after any pooling
                patches = model.encode_features(data.cls[:1].float(), data.patches[:1].float(), with_cls=False,
                                                with_names=False).patches.indices.shape[1]
        length = patches + (model.name_head.slots if model.name_head is not None else 0)
        self.pool = FoundCodes(len(rounds) * settings.instructions, length)

    @property
    def modules(self) -> dict[str, torch.nn.Module]:
        return {"found_codes": self.pool}

    def before_step(self) -> None:
        self.pool.step += 1
        if int(self.pool.step[0]) in self.rounds:
            self.search(int(self.pool.step[0]))

    def apply(self, batch: Stage2Batch, generator: torch.Generator) -> None:
        size = int(self.pool.size[0])
        chosen = batch.replayed & (torch.rand(len(batch.imaged), generator=generator) < self.settings.fraction)
        entries = torch.randint(max(size, 1), (len(batch.imaged),), generator=generator)
        if size and chosen.any():
            batch.image_tokens = batch.image_tokens.clone()
            batch.image_tokens[chosen] = with_found_codes(self.model, batch.image_tokens[chosen],
                                                          self.pool.codes[entries[chosen]])

    def search(self, at: int) -> None:
        """One round: search for a fresh draw of instructions against the model as it is at step `at`, each
        from a random dialog image's codes, and add what it finds to the pool."""
        model, data, settings = self.model, self.data, self.settings
        draw = torch.Generator().manual_seed(self.seed * 100_003 + at)   # its own stream: the loop's is left alone
        which = torch.randperm(len(data.search_sequences), generator=draw)[:settings.instructions].tolist()
        rows = torch.randint(len(data.cls), (len(which),), generator=draw)
        training = model.llm.training
        model.llm.eval()
        device = next(model.mm_projector.parameters()).device
        if data.codes is not None:
            starts = data.codes[rows].long().to(device)
            patch_count = starts.shape[1]
        else:
            with torch.no_grad():
                encoding = model.encode_features(data.cls[rows].float().to(device),
                                                 data.patches[rows].float().to(device), with_cls=False,
                                                 name_features=_rows(data.head_cls, rows, device))
            starts, patch_count = encoding.patches.indices, encoding.patches.indices.shape[1]
            if encoding.name_picks is not None:
                starts = torch.cat([starts, encoding.name_picks.to(starts)], 1)
        starts = starts.cpu()  # code sequences live on the CPU (the objective moves what it scores)
        objective = CodeObjective.over_codes(model, [data.search_sequences[i] for i in which], patch_count)
        found, history = search_each(objective, starts, settings.sweeps, 1, settings.candidates,
                                     settings.batch_size, seed=self.seed + at, desc=f"stage-2 code search, step {at}")
        model.llm.train(training)
        self.pool.add(found)
        logger.info("stage-2 code search at step %d: %d training instructions, target loss %.3f -> %.3f, %.1f of %d "
                    "positions changed; %d sequences in the pool", at, len(which),
                    sum(history["start_loss"]) / len(which), sum(history["best_loss"]) / len(which),
                    float((found != starts).sum(1).float().mean()), starts.shape[1], int(self.pool.size[0]))


def with_found_codes(model: QMLLM, image_tokens: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """`image_tokens` (B, M + N, d_h) of whole code sequences (B, L): their N patch codes (codebook rows), then
    (with a name head) their S name picks (the picked entries' tokens)."""
    patches = codes.shape[1] - (model.name_head.slots if model.name_head is not None else 0)
    patch_tokens = model.patch_quantizer.lookup(codes[:, :patches]).to(image_tokens.dtype)
    names = model.name_tokens_of(image_tokens, patches)
    tokens = patch_tokens if names is None else model._with_names(names, patch_tokens)
    if model.name_head is None:
        return tokens
    picked = model.name_head.lookup(codes[:, patches:], model.llm.get_input_embeddings()).to(tokens.dtype)
    return model._with_names(picked, model.patch_tokens_of(tokens, picked.shape[1]))


@dataclass
class Distillation:
    """`weight` times the KL divergence from the `teacher`'s next-token distributions (the foundation LLM,
    frozen) over each replayed instruction's answer, the teacher reading the instruction as text: an image in
    the context should not change how the model answers or refuses a request. The teacher must read the
    request exactly as it was trained to: `image_prefix` (what the placeholder brings into the prompt) is
    removed for it; a stray newline alone makes it refuse benign requests."""
    teacher: torch.nn.Module
    weight: float
    image_prefix: list[int]

    def __post_init__(self):
        if not self.image_prefix:
            raise ValueError("distillation needs image_prefix, the ids `<image>\\n` brings into a prompt")
        self.teacher.requires_grad_(False).eval()

    def losses(self, model: QMLLM, batch: Stage2Batch, dialogs: int) -> dict[str, torch.Tensor]:
        spliced = model.splice(batch.ids, batch.labels, batch.image_tokens)
        out = model.llm(inputs_embeds=spliced["inputs_embeds"], attention_mask=spliced["attention_mask"],
                        labels=spliced["labels"])
        replayed = [k for k, i in enumerate(batch.picks) if i >= dialogs]
        if not replayed:
            kl = out.loss.new_zeros(())
        else:
            texts = [text_only(batch.ids[k], batch.labels[k], self.image_prefix) for k in replayed]
            kl = answer_kl(out.logits[replayed], spliced["labels"][replayed], self.teacher, [t[0] for t in texts],
                           [t[1] for t in texts])
        return {"lm": out.loss, "distill": kl, "loss": out.loss + self.weight * kl}


def draw_batch(model: QMLLM, data: Stage2Data, batch_size: int,
               generator: torch.Generator) -> tuple[Stage2Batch, torch.Generator]:
    """A batch of examples and, for those with an image, what the LLM reads for it (projector and codebooks
    frozen). Returns the generator this process continues with (its share of the batch, `rank_share`)."""
    picks = torch.randint(len(data.examples), (batch_size,), generator=generator).tolist()
    picks, generator = rank_share(picks, generator)  # this process's share (all of it with one process)
    imaged = [i for i in picks if data.examples[i][2] >= 0]  # image tokens are spliced in this order
    batch = Stage2Batch(picks, [data.examples[i][0] for i in picks], [data.examples[i][1] for i in picks], imaged)
    rows = [data.examples[i][2] for i in imaged]
    if rows and data.codes is not None:  # image_input: codes
        device = next(model.mm_projector.parameters()).device
        batch.image_tokens = model.patch_quantizer.lookup(data.codes[rows].long().to(device))
        batch.replayed = torch.tensor([i >= data.dialogs for i in imaged])
    elif rows:
        device = next(model.mm_projector.parameters()).device
        with torch.no_grad():
            batch.image_tokens = model.encode_features(data.cls[rows].float().to(device),
                                                       data.patches[rows].float().to(device), with_cls=False,
                                                       name_features=_rows(data.head_cls, rows, device)).image_tokens
            batch.replayed = torch.tensor([i >= data.dialogs for i in imaged])
    return batch, generator


def train_stage2(model: QMLLM, data: Stage2Data, settings: Stage2Settings, seed: int,
                 teacher: torch.nn.Module | None = None, step_logger: StepLogger | None = None,
                 checkpoint: TrainingCheckpoint | None = None,
                 distributed: DistributedSettings | None = None) -> tuple[QMLLM, dict[str, bytes]]:
    """Stage 2: train the LLM on `data`; distillation from `teacher` when given and `settings.distill_weight`
    > 0; the search augmentation when its fraction > 0 and the model is quantized (no draw otherwise, so the
    paper's stage 2 stays bit for bit). Returns the model (its LLM with any LoRA adapters merged) and the
    adapters alone ({} for full fine-tuning)."""
    _freeze_all_but_llm(model, settings.lora)
    if settings.image_input == "codes" and model.quantized and data.codes is None:
        if model.name_head is not None:
            raise ValueError("finetune.stage2.image_input: codes reads patch codes alone; a model with a name head "
                             "needs its features (image_input: features)")
        for module in modules_of(data.cls, data.patches):  # a tower computing features on read: beside the model
            module.to(model.device)
        data = dataclasses.replace(data, codes=patch_codes(model, data))
    distill = Distillation(teacher, settings.distill_weight, data.image_prefix) \
        if teacher is not None and settings.distill_weight > 0 else None
    rounds = rounds_within(settings.search_augment, data.search_sequences, settings.training.steps)
    augmentations = [SearchAugmentation(model, data, settings.search_augment, rounds, seed)] \
        if model.quantized and rounds else []
    modules = {"llm": model.llm}
    for augmentation in augmentations:
        modules.update(augmentation.modules)

    def step(generator: torch.Generator) -> dict[str, torch.Tensor]:
        for augmentation in augmentations:
            augmentation.before_step()
        batch, generator = draw_batch(model, data, settings.training.batch_size, generator)
        if batch.imaged:
            with torch.no_grad():
                for augmentation in augmentations:
                    augmentation.apply(batch, generator)
        if distill is None:
            return {"loss": model(batch.ids, batch.labels, batch.image_tokens).loss}
        return distill.losses(model, batch, data.dialogs)

    if settings.gradient_checkpointing:
        activation_checkpointing(model.llm, True)
    train_loop(modules, step, settings.training, seed, step_logger, checkpoint,
               desc=f"finetune {model.config.variant}", distributed=distributed,
               carry=(model, *modules_of(data.cls, data.head_cls, data.patches),
                      *((teacher,) if teacher is not None else ())))
    if settings.gradient_checkpointing:
        activation_checkpointing(model.llm, False)
    adapters = adapter_files(model.llm)
    model.llm = merged(model.llm)
    if adapters:
        mark_adapted(model.llm)  # a catalogue entry with `adapter_of` saves the pointer, not the weights
    return model, adapters


def _freeze_all_but_llm(model: QMLLM, lora: LoraSpec) -> None:
    """Projector, codebooks and heads frozen in eval mode; the LLM trainable, or with `lora.enabled` frozen
    under fresh trainable adapters."""
    for frozen in (model.mm_projector, model.cls_projector, model.cls_quantizer, model.patch_quantizer,
                   model.name_head):
        if frozen is not None:
            frozen.requires_grad_(False).eval()
    if lora.enabled:
        model.llm = with_lora(model.llm, lora)  # the base frozen, the adapters trainable
    else:
        model.llm.requires_grad_(True)


def _rows(features: torch.Tensor | None, rows, device: torch.device | None = None) -> torch.Tensor | None:
    return None if features is None else features[rows].float().to(device)


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
