"""Guarded inference, usable without Kedro: image -> CLS code -> safety map -> refusal or the LLM's answer.

A trained model is described by a small manifest (`guarded.json`, written by the `safety_map` pipeline)
that points at the artifacts the pipelines saved: tokenizer, CLIP, the finetuned LLM, the stage-1
weights (projector and codebooks) and the safety map. The LLM is never run for a refused image.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel, LlamaForCausalLM

from qmllm_pipeline.models.clip import pixel_values
from qmllm_pipeline.models.projector import build_mm_projector
from qmllm_pipeline.models.qmllm import QMLLM
from qmllm_pipeline.models.quantizer import VectorQuantizer
from qmllm_pipeline.models.safety_map import NEUTRAL
from qmllm_pipeline.models.tokenizer import IMAGE_TOKEN, encode_prompt
from qmllm_pipeline.models.vision import VisionTower

REFUSAL_MESSAGE = "I'm sorry, but I can't help with this image: it appears to show {category} content."
ARTIFACTS = ("tokenizer", "clip_model", "clip_image_processor", "llm", "stage1_weights", "safety_map")


class ModelNotReadyError(FileNotFoundError):
    """The manifest or one of the artifacts it names is missing: the model is not trained (yet)."""


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


class GuardedQMLLM:
    def __init__(self, model: QMLLM, tokenizer, processor, safety_map: pd.DataFrame,
                 refusal_message: str = REFUSAL_MESSAGE):
        self.model, self.tokenizer, self.processor = model.eval(), tokenizer, processor
        self.labels = safety_map.set_index("code")
        self.refusal_message = refusal_message

    @classmethod
    def from_manifest(cls, path: str | Path) -> GuardedQMLLM:
        path = Path(path)
        if not path.is_file():
            raise ModelNotReadyError(f"{path}: no trained model here (run `kedro run` first, or pass --model)")
        try:
            manifest = json.loads(path.read_text())
            artifacts, config = manifest["artifacts"], manifest["config"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ModelNotReadyError(f"{path}: not a guarded-model manifest") from None
        root = path.parent
        located = {name: (root / artifacts[name]).resolve() for name in ARTIFACTS if name in artifacts}
        missing = [name for name in ARTIFACTS if name not in located or not located[name].exists()]
        if missing:
            raise ModelNotReadyError(f"{path}: missing trained artifacts {missing}")
        tokenizer = AutoTokenizer.from_pretrained(located["tokenizer"], local_files_only=True)
        clip = CLIPModel.from_pretrained(located["clip_model"], local_files_only=True, use_safetensors=True)
        processor = CLIPImageProcessor.from_pretrained(located["clip_image_processor"], local_files_only=True)
        llm = LlamaForCausalLM.from_pretrained(located["llm"], local_files_only=True, use_safetensors=True)
        tower = VisionTower.from_clip(clip, select_layer=config["select_layer"], cls_source=config["cls_source"])
        width = llm.config.hidden_size
        state = load_file(located["stage1_weights"])
        model = QMLLM(build_mm_projector(config["projector"], tower.hidden_size, width, config["layernorm"]), llm,
                      tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), vision_tower=tower,
                      cls_quantizer=VectorQuantizer(config["cls_codes"], width),
                      patch_quantizer=VectorQuantizer(config["patch_codes"], width))
        for name in ("mm_projector", "cls_quantizer", "patch_quantizer"):
            getattr(model, name).load_state_dict({k.split(".", 1)[1]: v for k, v in state.items()
                                                  if k.startswith(f"{name}.")})
        return cls(model, tokenizer, processor, pd.read_parquet(located["safety_map"]))

    def _pixels(self, images: list[Image.Image]) -> torch.Tensor:
        crop = self.processor.crop_size
        if all(i.size == (crop["width"], crop["height"]) for i in images):
            import numpy as np

            arrays = torch.from_numpy(np.stack([np.asarray(i.convert("RGB")) for i in images])).permute(0, 3, 1, 2)
            return pixel_values(arrays, self.processor)
        return self.processor(images=[i.convert("RGB") for i in images], return_tensors="pt")["pixel_values"]

    @torch.no_grad()
    def check(self, images: list[Image.Image]) -> list[Verdict]:
        """Safety verdicts only: encode, project, CLS-quantize, look up. The LLM is not touched."""
        return self._encode_and_judge(images)[1]

    def _encode_and_judge(self, images):
        encoding = self.model.encode_images(self._pixels(images))
        verdicts = []
        for code in encoding.cls.indices.tolist():
            row = self.labels.loc[code]
            refused = row["label"] != NEUTRAL
            category = str(row["label"])
            verdicts.append(Verdict(refused, category, int(code), float(row["probability"]),
                                    self.refusal_message.format(category=category.replace("_", " "))
                                    if refused else ""))
        return encoding, verdicts

    @torch.no_grad()
    def answer(self, images: list[Image.Image], prompts: list[str], max_new_tokens: int = 32) -> list[Answer]:
        """Refusal or generated answer per (image, prompt); only the accepted images reach the LLM."""
        encoding, verdicts = self._encode_and_judge(images)
        accepted = [i for i, v in enumerate(verdicts) if not v.refused]
        texts = {i: verdicts[i].message for i in range(len(images)) if verdicts[i].refused}
        if accepted:
            ids = [encode_prompt(self.tokenizer, f"{IMAGE_TOKEN}\n{prompts[i]}") for i in accepted]
            new = self.model.generate(ids, encoding.image_tokens[accepted], max_new_tokens,
                                      self.tokenizer.pad_token_id, self.tokenizer.eos_token_id)
            for i, text in zip(accepted, self.tokenizer.batch_decode(new, skip_special_tokens=True), strict=True):
                texts[i] = text.strip()
        return [Answer(verdicts[i], texts[i]) for i in range(len(images))]

