"""Nodes of the `features` pipeline: the frozen vision tower's outputs for the caption and dialog images, and
the L_semantic targets of the captions. With `features.cache: true` (the default world) the tower runs once
over every image and its outputs are saved (in shards, computed as they are saved), so stage 1 never touches
pixels; with `cache: false` (the real environment) nothing is computed here and stages 1 and 2 run the tower
on each batch's images (`models/image_data.py: TowerFeatures`).

Two CLS features and two targets are cached: `cls` / `targets` are the paper's (stage 1's CLS terms on the
shared projector), `head_cls` / `head_targets` what a decoupled CLS head reads and is trained towards
(`features.cls_head`). Both come from the same pass of the tower; the extra cost is a few seconds."""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from dataclasses import dataclass
from typing import Literal

import pandas as pd
import torch
from tqdm.auto import tqdm

from qmllm_pipeline.models.clip import text_embeddings
from qmllm_pipeline.models.device import resolve_device
from qmllm_pipeline.models.feature_shards import Shards, shard_name
from qmllm_pipeline.models.image_data import SceneImages, TowerFeatures, image_loader
from qmllm_pipeline.models.params import parse
from qmllm_pipeline.models.vision import VisionTower
from qmllm_pipeline.world.scenes import scene_texts

logger = logging.getLogger(__name__)
SEMANTIC_TARGET_SOURCES = ("llm", "clip_text")
ClsSource = Literal["layer", "pooled", "projected"]


@dataclass(frozen=True)
class VisionTowerSettings:
    """`features.vision_tower`: which hidden layer the patches come from, the paper's CLS source, and the
    pooling of the patch grid (`VisionTower`)."""
    select_layer: int = -2
    cls_source: ClsSource = "layer"
    patch_pool: int = 1


@dataclass(frozen=True)
class ClsHeadFeatures:
    """`features.cls_head`: what a decoupled CLS head reads and is trained towards."""
    cls_source: ClsSource = "projected"
    semantic_target_source: Literal["llm", "clip_text"] = "clip_text"
    semantic_target_text: Literal["caption", "objects"] = "objects"


@dataclass(frozen=True)
class FeatureSettings:
    """`features`: the vision tower's outputs cached once, and the L_semantic targets of the captions."""
    vision_tower: VisionTowerSettings
    cls_head: ClsHeadFeatures
    semantic_target_source: Literal["llm", "clip_text"] = "llm"
    semantic_target_text: Literal["caption", "objects"] = "caption"
    batch_size: int = 512
    dtype: str = "float16"
    rows_per_shard: int = 4096
    num_workers: int = 0
    cache: bool = True

    def __post_init__(self):
        if self.batch_size < 1 or self.rows_per_shard < 1 or self.num_workers < 0:
            raise ValueError(f"features: batch_size ({self.batch_size}) and rows_per_shard ({self.rows_per_shard}) "
                             f"must be at least 1 and num_workers ({self.num_workers}) at least 0")


def _extract(table: pd.DataFrame, clip_model, clip_image_processor, params: dict, device: str,
             name: str) -> Shards | TowerFeatures:
    """The table's features as lazy shards of `rows_per_shard` rows: each, when called, decodes its images
    through a DataLoader (`num_workers` processes) and runs the tower over them `batch_size` at a time on
    `device`, the features coming back to the CPU. With `cache: false`, none are computed here:
    `TowerFeatures` runs the tower for the rows each batch asks for, on the device the training step puts it
    on (the tower stays on the CPU until then: a training node that forks GPU workers needs CUDA untouched)."""
    settings = parse(FeatureSettings, params, "features")
    if not settings.cache:
        tower = VisionTower.from_clip(clip_model, **dataclasses.asdict(settings.vision_tower))
        logger.info("%s features: computed on the fly for each batch (features.cache: false)", name)
        return TowerFeatures(SceneImages(table, clip_image_processor), tower, settings.vision_tower.cls_source,
                             settings.cls_head.cls_source, getattr(torch, settings.dtype), settings.batch_size,
                             settings.num_workers)
    if settings.rows_per_shard % settings.batch_size:
        raise ValueError(f"features.rows_per_shard ({settings.rows_per_shard}) must be a multiple of "
                         f"features.batch_size ({settings.batch_size}), so that every batch lies in one shard")
    tower = VisionTower.from_clip(clip_model, **dataclasses.asdict(settings.vision_tower)).eval()
    tower.to(resolve_device(device))
    sources = tuple(dict.fromkeys((settings.vision_tower.cls_source, settings.cls_head.cls_source)))
    dtype = getattr(torch, settings.dtype)
    images = SceneImages(table, clip_image_processor)
    count = len(images)
    shards = (count + settings.rows_per_shard - 1) // settings.rows_per_shard

    @torch.no_grad()
    def shard(index: int) -> dict[str, torch.Tensor]:
        rows = range(index * settings.rows_per_shard, min(count, (index + 1) * settings.rows_per_shard))
        started = time.perf_counter()
        chunks = {"cls": [], "head_cls": [], "patches": []}
        loader = image_loader(images, rows, settings.batch_size, settings.num_workers)
        for pixels in tqdm(loader, desc=f"features {name} {index + 1}/{shards}", unit="batch", mininterval=2):
            cls_features, patch_features = tower.features(pixels, sources)
            chunks["cls"].append(cls_features[settings.vision_tower.cls_source].to(dtype).cpu())
            chunks["head_cls"].append(cls_features[settings.cls_head.cls_source].to(dtype).cpu())
            chunks["patches"].append(patch_features.to(dtype).cpu())
        features = {key: torch.cat(parts) for key, parts in chunks.items()}
        logger.info("%s features, shard %d/%d (rows %d-%d): cls %s, head_cls %s, patches %s in %.1f s", name,
                    index + 1, shards, rows.start, rows.stop - 1, tuple(features["cls"].shape),
                    tuple(features["head_cls"].shape), tuple(features["patches"].shape),
                    time.perf_counter() - started)
        return features

    return {shard_name(index): functools.partial(shard, index) for index in range(shards)}


def extract_caption_features(caption_corpus: pd.DataFrame, clip_model, clip_image_processor, params: dict,
                             device: str) -> Shards | TowerFeatures:
    """CLS (the paper's and the CLS head's) and patch features of every caption-corpus image, in corpus order,
    as lazy shards (`models/feature_shards.py`: the catalogue's dataset computes and writes one at a time), or
    with `cache: false` as `TowerFeatures` (computed per batch by whoever reads them)."""
    return _extract(caption_corpus, clip_model, clip_image_processor, params, device, "caption_corpus")


def extract_dialog_features(dialogs: pd.DataFrame, clip_model, clip_image_processor, params: dict,
                            device: str) -> Shards | TowerFeatures:
    """CLS (the paper's and the CLS head's) and patch features of every dialog image, in dialog order, as lazy
    shards or `TowerFeatures`."""
    return _extract(dialogs, clip_model, clip_image_processor, params, device, "dialogs")


def _target_texts(settings: FeatureSettings, source: str) -> list[str]:
    """The text sides (caption, objects) whose L_semantic target `source` (llm or clip_text) gives: stage 1's
    and the CLS head's, each once."""
    wanted = [(settings.semantic_target_source, settings.semantic_target_text),
              (settings.cls_head.semantic_target_source, settings.cls_head.semantic_target_text)]
    return list(dict.fromkeys(text for of, text in wanted if of == source))


def llm_text_targets(caption_corpus: pd.DataFrame, tokenizer, llm, params: dict, device: str) -> dict:
    """The frozen LLM's target for each caption-corpus row, per text side that a target is taken from with
    `semantic_target_source: llm` ({} when none is), computed on `device`. `params`: features."""
    return _targets_of("llm", caption_corpus, tokenizer, llm, params, device)


def clip_text_targets(caption_corpus: pd.DataFrame, clip_model, clip_tokenizer, params: dict, device: str) -> dict:
    """CLIP's text embedding for each caption-corpus row, per text side that a target is taken from with
    `semantic_target_source: clip_text` ({} when none is), computed on `device`. `params`: features."""
    return _targets_of("clip_text", caption_corpus, clip_tokenizer, clip_model, params, device)


def _targets_of(source: str, caption_corpus: pd.DataFrame, tokenizer, model, params: dict, device: str) -> dict:
    """`semantic_target_vectors` of `source` (its `model` read through `tokenizer`) for each text side that
    asks for it; the model is moved to `device` only when one does."""
    settings = parse(FeatureSettings, params, "features")
    texts = _target_texts(settings, source)
    if texts:
        model.to(resolve_device(device))
    llm, clip_model = (model, None) if source == "llm" else (None, model)
    return {text: semantic_target_vectors(caption_corpus, tokenizer, llm, clip_model, source, text,
                                          settings.batch_size, tokenizer)
            for text in texts}


def caption_semantic_targets(llm_targets: dict, clip_targets: dict, params: dict) -> dict[str, torch.Tensor]:
    """The L_semantic targets of the caption corpus, one row per image: `targets` from `semantic_target_source`
    / `semantic_target_text` (stage 1's, the paper's H_caption by default), `head_targets` from `cls_head`'s
    (a decoupled CLS head's). Stored raw; whether to standardise them is a training parameter. `params`:
    features."""
    settings = parse(FeatureSettings, params, "features")
    by_source = {"llm": llm_targets, "clip_text": clip_targets}
    return {"targets": by_source[settings.semantic_target_source][settings.semantic_target_text],
            "head_targets": by_source[settings.cls_head.semantic_target_source][
                settings.cls_head.semantic_target_text]}


@torch.no_grad()
def semantic_target_vectors(caption_corpus: pd.DataFrame, tokenizer, llm, clip_model, source: str, text_side: str,
                            batch_size: int, clip_tokenizer=None) -> torch.Tensor:
    """One target per caption-corpus row, from the text `text_side` names (the whole caption, or its object
    phrase only). `source` says whose representation: `llm`, the frozen LLM's last hidden states averaged over
    the text's tokens (the paper's H_caption); `clip_text`, CLIP's text embedding of it (a semantic space made
    for matching images), its text read by `clip_tokenizer` (None: `tokenizer`; the stand-ins share one)."""
    if source not in SEMANTIC_TARGET_SOURCES:
        raise ValueError(f"semantic_target_source must be one of {SEMANTIC_TARGET_SOURCES}, got {source!r}")
    captions = scene_texts(caption_corpus, text_side)
    unique = sorted(set(captions))
    vectors = []
    for start in tqdm(range(0, len(unique), batch_size), desc=f"semantic targets ({source}, {text_side})",
                      mininterval=2):
        chunk = unique[start:start + batch_size]
        if source == "clip_text":
            vectors.append(text_embeddings(clip_model, clip_tokenizer or tokenizer, chunk,
                                           clip_model.config.text_config.max_position_embeddings).cpu())
            continue
        encoded = tokenizer(chunk, add_special_tokens=False, padding=True, return_tensors="pt").to(llm.device)
        hidden = llm(**encoded, output_hidden_states=True).hidden_states[-1]
        mask = encoded["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        vectors.append(((hidden * mask).sum(1) / mask.sum(1)).cpu())
    by_caption = dict(zip(unique, torch.cat(vectors), strict=True))
    return torch.stack([by_caption[c] for c in captions]).float()
