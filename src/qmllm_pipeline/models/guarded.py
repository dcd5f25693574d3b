"""Guarded inference, usable without Kedro: image -> guard -> refusal, or the LLM's answer.

Q-MLLM's guard is its CLS code looked up in the safety map; the SafeCLIP-style baseline's is a CLIP
zero-shot filter; the continuous baseline has none. All three answer through the same `GuardedMLLM`.

A trained model is a Q-MLLM model directory (`QMLLM.save_pretrained`: config, stage-1 weights and the
references to CLIP, tokenizer and LLM) plus the safety map beside it; `guarded.json`, written by the
`safety_map` pipeline when the map is built, says where both are. The LLM is never run for a refused image.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow
import torch
from PIL import Image
from safetensors import SafetensorError
from tqdm.auto import tqdm
from transformers import AutoTokenizer, CLIPImageProcessor

from qmllm_pipeline.constants import IMAGE_TOKEN
from qmllm_pipeline.files import sha256_file
from qmllm_pipeline.images import to_rgb
from qmllm_pipeline.models.clip import pixel_values
from qmllm_pipeline.models.conversation import prepare_for_images
from qmllm_pipeline.models.device import synchronize
from qmllm_pipeline.models.qmllm import QMLLM, ImageEncoding
from qmllm_pipeline.models.safeclip import SafeCLIPFilter, refuse_above
from qmllm_pipeline.models.safety_map import NEUTRAL, REFUSE_UNSEEN
from qmllm_pipeline.models.tokenizer import encode_prompt
from qmllm_pipeline.sealing import sealed_files

logger = logging.getLogger(__name__)

REFUSAL_MESSAGE = "I'm sorry, but I can't help with this image: it appears to show {category} content."


class ModelNotReadyError(FileNotFoundError):
    """The manifest or one of the artifacts it names is missing: the model is not trained (yet)."""


class UntrustedModelError(ValueError):
    """A guarded model whose files disagree with its seal or with each other: refused, never run."""


@dataclass
class Verdict:
    refused: bool
    category: str        # the code's label: a toxic category, or "neutral"
    code: int            # cls_index
    probability: float   # p(category | code) over D_map
    message: str = ""    # the refusal message, when refused


@dataclass
class Answer:
    verdict: Verdict
    text: str            # the refusal message or the generated answer


class SafetyMapGuard:
    """Q-MLLM's check: the image's CLS code, looked up in the safety map built from D_map."""

    def __init__(self, safety_map: pd.DataFrame, refusal_message: str = REFUSAL_MESSAGE):
        self.refusal_message = refusal_message
        # plain dicts by code: a pandas lookup per image would cost more than the whole CLS path
        codes = safety_map["code"].tolist()
        self.label = dict(zip(codes, safety_map["label"].astype(str).tolist(), strict=True))
        self.probability = dict(zip(codes, safety_map["probability"].astype(float).tolist(), strict=True))

    @property
    def neutral_codes(self) -> list[int]:
        return [code for code, label in self.label.items() if label == NEUTRAL]

    def __call__(self, pixels: torch.Tensor, cls_index: torch.Tensor) -> list[Verdict]:
        # a code the map does not hold is refused (check_consistent keeps a loaded map whole)
        labels = [self.label.get(code, REFUSE_UNSEEN) for code in cls_index.tolist()]
        return [_verdict(label != NEUTRAL, label, code, self.probability.get(code, float("nan")),
                         self.refusal_message) for code, label in zip(cls_index.tolist(), labels, strict=True)]


class SafeCLIPGuard:
    """The SafeCLIP-style pre-detection: CLIP zero-shot over category descriptions, refuse above a threshold."""

    def __init__(self, safeclip: SafeCLIPFilter, refusal_message: str = REFUSAL_MESSAGE):
        self.safeclip, self.refusal_message = safeclip, refusal_message

    def __call__(self, pixels: torch.Tensor, cls_index: torch.Tensor | None) -> list[Verdict]:
        categories, confidences = self.safeclip.pixel_scores(pixels)
        refused = refuse_above(confidences, self.safeclip.threshold)
        return [_verdict(bool(r), str(c) if r else NEUTRAL, -1, float(p), self.refusal_message)
                for c, p, r in zip(categories, confidences, refused, strict=True)]


def _verdict(refused: bool, category: str, code: int, probability: float, message: str) -> Verdict:
    return Verdict(refused, category, code, probability,
                   message.format(category=category.replace("_", " ")) if refused else "")


class GuardedMLLM:
    """An MLLM behind an optional image guard. The three evaluated systems are instances: `baseline` (the
    continuous model, no guard), `safeclip` (baseline + SafeCLIPGuard), `qmllm` (quantized + SafetyMapGuard).
    The LLM is never run for a refused image. A system without a guard must say so (`unguarded=True`): a
    forgotten guard never answers as if every image were neutral."""

    def __init__(self, model: QMLLM, tokenizer, processor, guard: Callable | None = None, *, unguarded: bool = False):
        if guard is None and not unguarded:
            raise ValueError("GuardedMLLM without a guard: pass one, or unguarded=True to run the model unguarded")
        if guard is not None and unguarded:
            raise ValueError("GuardedMLLM: a guard and unguarded=True contradict each other")
        self.model, self.tokenizer, self.processor, self.guard = model.eval(), tokenizer, processor, guard

    def _pixels(self, images: list[Image.Image]) -> torch.Tensor:
        crop = self.processor.crop_size
        if all(i.size == (crop["width"], crop["height"]) for i in images):
            arrays = torch.from_numpy(np.stack([np.asarray(to_rgb(i)) for i in images])).permute(0, 3, 1, 2)
            return pixel_values(arrays, self.processor)
        return self.processor(images=[to_rgb(i) for i in images], return_tensors="pt")["pixel_values"]

    def _judge(self, pixels: torch.Tensor, cls_index: torch.Tensor | None) -> list[Verdict]:
        """A guard is called with the pixels and, for a quantized model, the images' CLS codes."""
        if self.guard is None:
            return [Verdict(False, NEUTRAL, -1, 0.0) for _ in range(len(pixels))]
        return self.guard(pixels, cls_index)

    def _encode_and_judge(self, pixels: torch.Tensor) -> tuple[ImageEncoding, list[Verdict]]:
        encoding = self.model.encode_images(pixels)
        return encoding, self._judge(pixels, encoding.cls.indices if encoding.cls is not None else None)

    @torch.no_grad()
    def check(self, images: list[Image.Image]) -> list[Verdict]:
        """Safety verdicts only: encode, project, CLS-quantize, look up. The LLM is not touched."""
        return self.check_pixels(self._pixels(images))

    @torch.no_grad()
    def check_pixels(self, pixels: torch.Tensor) -> list[Verdict]:
        """Only what the guard needs: for Q-MLLM the CLS path (no patch tokens, no LLM)."""
        if self.guard is None:
            return self._judge(pixels, None)
        return self._judge(pixels, self.model.cls_index(pixels) if self.model.quantized else None)

    @torch.no_grad()
    def answer(self, images: list[Image.Image], prompts: list[str], max_new_tokens: int = 32) -> list[Answer]:
        """Refusal or generated answer per (image, prompt); only the accepted images reach the LLM."""
        return self.answer_pixels(self._pixels(images), prompts, max_new_tokens)

    def respond(self, images: torch.Tensor, prompts: list[str], max_new_tokens: int = 32, batch_size: int = 64,
                desc: str | None = None) -> list[Answer]:
        """`answer` for one prompt per uint8 image (N, 3, H, W), in batches (a progress bar when `desc`)."""
        answers = []
        for start in tqdm(range(0, len(prompts), batch_size), desc=desc, mininterval=2, disable=desc is None):
            pixels = pixel_values(images[start:start + batch_size], self.processor)
            answers += self.answer_pixels(pixels, prompts[start:start + batch_size], max_new_tokens)
        return answers

    @torch.no_grad()
    def name_picks(self, images: torch.Tensor, batch_size: int = 64) -> list[str] | None:
        """The name head's first pick for each uint8 image (N, 3, H, W), as a name ("" for the empty pick); None
        for a model without a name head."""
        head = self.model.name_head
        if head is None:
            return None
        vocabulary = self.model.config.name_vocabulary
        picks = []
        for start in range(0, len(images), batch_size):
            encoding = self.model.encode_images(pixel_values(images[start:start + batch_size], self.processor))
            picks += encoding.name_picks[:, 0].tolist()
        return [vocabulary[p] if p < len(vocabulary) else "" for p in picks]

    @torch.no_grad()
    def answer_pixels(self, pixels: torch.Tensor, prompts: list[str], max_new_tokens: int = 32,
                      min_new_tokens: int = 0) -> list[Answer]:
        """`answer` on normalised pixel values (B, 3, H, W); one image per prompt."""
        _no_placeholder(prompts)
        encoding, verdicts = self._encode_and_judge(pixels)
        accepted = [i for i, v in enumerate(verdicts) if not v.refused]
        texts = {i: verdicts[i].message for i in range(len(pixels)) if verdicts[i].refused}
        if accepted:
            generated = self.answer_tokens(encoding.image_tokens[accepted], [prompts[i] for i in accepted],
                                           max_new_tokens, min_new_tokens)
            texts.update(zip(accepted, generated, strict=True))
        return [Answer(verdicts[i], texts[i]) for i in range(len(pixels))]

    @torch.no_grad()
    def answer_tokens(self, image_tokens: torch.Tensor, prompts: list[str], max_new_tokens: int = 32,
                      min_new_tokens: int = 0) -> list[str]:
        """The LLM's answer to each prompt with its image tokens (B, N, d_h), past any guard: what an image
        the guard accepted gets, or a code sequence chosen directly (the code-space attack)."""
        _no_placeholder(prompts)
        ids = [encode_prompt(self.tokenizer, f"{IMAGE_TOKEN}\n{prompt}") for prompt in prompts]
        limit = getattr(self.model.llm.config, "max_position_embeddings", None)
        longest = max(len(i) for i in ids) - 1 + image_tokens.shape[1] + max_new_tokens
        if limit is not None and longest > limit:
            raise ValueError(f"the prompt is too long: with the image's {image_tokens.shape[1]} tokens and "
                             f"{max_new_tokens} new ones it needs {longest} positions; the LLM reads {limit}")
        new = self.model.generate(ids, image_tokens, max_new_tokens, self.tokenizer.pad_token_id,
                                  self.tokenizer.eos_token_id, min_new_tokens)
        return [text.strip() for text in self.tokenizer.batch_decode(new, skip_special_tokens=True)]


def _no_placeholder(prompts: list[str]) -> None:
    if any(IMAGE_TOKEN in prompt for prompt in prompts):
        raise ValueError(f"a prompt contains {IMAGE_TOKEN}, the image's placeholder; the image is added for you")


class GuardedQMLLM(GuardedMLLM):
    """The full method, loadable from the manifest the `safety_map` pipeline writes. Loaded so, `served_from`
    is the folder it was read from and `note` says why when that is the sealed copy, not the model folder."""

    def __init__(self, model: QMLLM, tokenizer, processor, safety_map: pd.DataFrame,
                 refusal_message: str = REFUSAL_MESSAGE):
        super().__init__(model, tokenizer, processor, SafetyMapGuard(safety_map, refusal_message))
        self.served_from: Path | None = None
        self.note: str | None = None

    @staticmethod
    def manifest(safety_map_file: str, toxic_codes: int, model_directory: str = ".",
                 references: list[str] = ()) -> dict:
        """What `guarded.json` holds: the model directory and the safety map, relative to the manifest, the
        number of toxic codes, and the paths whose files it is sealed over (`depends_on`: the model directory
        and the folders its config references; the saving dataset adds each file's hash under `files`)."""
        depends_on = sorted({model_directory, *references})
        return {"model": model_directory, "safety_map": safety_map_file, "toxic_codes": toxic_codes,
                "depends_on": depends_on}

    @classmethod
    def from_manifest(cls, path: str | Path, device: str | torch.device | None = None) -> GuardedQMLLM:
        """The guarded model a manifest names, on `device` (`auto`, `cpu`, `cuda`; None: the CPU)."""
        path = Path(path)
        if not path.is_file():
            raise ModelNotReadyError(f"{path}: no trained model here (run `kedro run` first, or pass --model)")
        try:
            manifest = json.loads(path.read_text())
            if not isinstance(manifest.get("model"), str) or not isinstance(manifest.get("safety_map"), str):
                raise TypeError
        except (json.JSONDecodeError, AttributeError, TypeError):
            raise ModelNotReadyError(f"{path}: not a guarded-model manifest") from None
        model_directory, map_file, note = sealed_model(path, manifest)  # a missing map fails the seal
        if note:
            logger.warning(note)
        try:
            model = QMLLM.from_pretrained(model_directory, device=device)
            config = model.config
            tokenizer = AutoTokenizer.from_pretrained(config.reference("tokenizer", model_directory),
                                                      local_files_only=True)
            if config.conversation_format is not None:  # a real LLM's tokenizer, prepared as in training
                prepare_for_images(tokenizer, None, config.conversation_format)
                if tokenizer.convert_tokens_to_ids(IMAGE_TOKEN) != config.image_token_id:
                    raise ModelNotReadyError(f"{path}: the referenced tokenizer gives {IMAGE_TOKEN} another id than "
                                             f"the model was trained with ({config.image_token_id})")
            processor = CLIPImageProcessor.from_pretrained(config.reference("image_processor", model_directory),
                                                           local_files_only=True)
        except FileNotFoundError as error:
            raise ModelNotReadyError(f"{path}: missing trained artifacts ({error})") from None
        except (OSError, ValueError, SafetensorError) as error:  # sealed as it is, but not loadable
            raise UntrustedModelError(f"{path}: the sealed model does not load: {' '.join(str(error).split())}"
                                      ) from None
        try:
            safety_map = pd.read_parquet(map_file)
        except (OSError, ValueError, pyarrow.ArrowException) as error:
            raise UntrustedModelError(f"{map_file}: not a readable Parquet table ({error})") from None
        check_consistent(model, safety_map, manifest, map_file)
        guarded = cls(model, tokenizer, processor, safety_map)
        guarded.served_from, guarded.note = model_directory, note
        return guarded


def verify_seal(path: Path, manifest: dict, copy: Path | None = None) -> None:
    """The files a manifest was sealed over are there and unchanged, and no file was added among them (the
    model folder's own files read from its sealed `copy` when given); else `UntrustedModelError` naming the
    first file that differs."""
    sealed = manifest.get("files")
    if not isinstance(sealed, dict) or not isinstance(manifest.get("depends_on"), list):
        raise UntrustedModelError(f"{path}: not sealed (no file hashes); run `kedro run --pipelines safety_map` to "
                                  "seal the model")
    found = sealed_files(path, manifest["depends_on"], str(manifest.get("model", ".")), copy)
    missing = [name for name in sealed if name not in found]
    if missing:
        raise UntrustedModelError(f"{path.parent / missing[0]}: missing (the model was sealed with it)")
    for name, file in found.items():
        if name not in sealed:
            raise UntrustedModelError(f"{file}: not part of the sealed model (added since)")
        if sha256_file(file) != sealed[name]:
            raise UntrustedModelError(f"{file}: changed since the model was sealed (its SHA-256 differs); retrain "
                                      "or run `kedro run --pipelines safety_map` to re-seal")


def sealed_model(path: Path, manifest: dict) -> tuple[Path, Path, str | None]:
    """The model folder and safety map to load: the live ones when they are as sealed, else the sealed copy
    when it is (the folder is being rewritten by a rerun, or was left mixed by a killed one), with a note
    saying so; else `UntrustedModelError` for the live folder."""
    model_directory, map_file = path.parent / manifest["model"], path.parent / manifest["safety_map"]
    try:
        verify_seal(path, manifest)
        return model_directory, map_file, None
    except UntrustedModelError as live:
        copy = manifest.get("sealed_copy")
        if not isinstance(copy, str) or not (path.parent / copy).is_dir():
            raise
        copy = Path(os.path.normpath(path.parent / copy))
        try:
            verify_seal(path, manifest, copy)
        except UntrustedModelError:
            raise live from None
        note = (f"{live}; serving the sealed copy {copy} instead (the model folder is being rewritten, or a run "
                "was killed before it re-sealed)")
        return copy, copy / os.path.relpath(map_file, model_directory), note


def check_consistent(model: QMLLM, safety_map: pd.DataFrame, manifest: dict, map_file: Path) -> None:
    """What a seal cannot see: finite weights, and a safety map made for this model's CLS codebook (one row per
    code, the manifest's count of toxic codes, at least one toxic code)."""
    bad = next((name for name, p in model.named_parameters() if not torch.isfinite(p).all()), None)
    if bad is not None:
        raise UntrustedModelError(f"{map_file.parent}: weight {bad} holds NaN or infinite values")
    if not {"code", "label", "probability"} <= set(safety_map.columns):
        raise UntrustedModelError(f"{map_file}: not a safety map (needs columns code, label, probability)")
    codes = model.cls_quantizer.num_codes if model.cls_quantizer is not None else 0
    if sorted(safety_map["code"].tolist()) != list(range(codes)):
        raise UntrustedModelError(f"{map_file}: its codes do not match the model's CLS codebook of {codes} codes "
                                  f"({len(safety_map)} rows)")
    toxic = int((safety_map["label"] != NEUTRAL).sum())
    if toxic == 0:
        raise UntrustedModelError(f"{map_file}: every code is labelled neutral; such a guard refuses nothing")
    if toxic != manifest.get("toxic_codes"):
        raise UntrustedModelError(f"{map_file}: {toxic} toxic codes, the manifest says {manifest.get('toxic_codes')}")


def evaluation_systems(baseline: QMLLM, qmllm: QMLLM, tokenizer, processor, safety_map: pd.DataFrame,
                       safeclip: SafeCLIPFilter) -> dict[str, GuardedMLLM]:
    """The three systems of the evaluation (docs/method.md): `baseline` (continuous, no guard), `safeclip` (the same
    model behind the CLIP filter) and `qmllm` (quantized, behind its safety map)."""
    return {"baseline": GuardedMLLM(baseline, tokenizer, processor, unguarded=True),
            "safeclip": GuardedMLLM(baseline, tokenizer, processor, SafeCLIPGuard(safeclip)),
            "qmllm": GuardedQMLLM(qmllm, tokenizer, processor, safety_map)}


def query_seconds(system: GuardedMLLM, image: torch.Tensor, prompt: str, max_new_tokens: int) -> float:
    """Wall time of one whole query at batch 1 on a uint8 image (3, H, W): pixels -> verdict -> refusal or
    answer (the `evaluate` pipeline's overhead measurement, and `qmllm bench`'s), on the model's device (waited
    for before and after: CUDA runs asynchronously)."""
    device = system.model.device
    synchronize(device)
    started = time.perf_counter()
    system.respond(image[None], [prompt], max_new_tokens, 1)
    synchronize(device)
    return time.perf_counter() - started
