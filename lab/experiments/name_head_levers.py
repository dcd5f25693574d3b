"""The name head's levers, on its own: what it reads (`inputs`), its width and its training length, each
trained by the pretrain pipeline's own `name_head` node and scored on held-out scenes before any LLM reads it.
The head's accuracy is the ceiling of what the MLLM can name through it (`finetune.json` has the MLLM's).
Run on demand (`python lab/name_head_levers.py --help`)."""

from __future__ import annotations

import itertools
import logging
import tempfile
import time

import pandas as pd
import torch

from qmllm_pipeline.dotted import with_overrides
from qmllm_pipeline.in_memory import run_in_memory
from qmllm_pipeline.models.names import NameHead, slot_targets
from qmllm_pipeline.models.qmllm import QMLLMConfig
from qmllm_pipeline.pipelines import features, pretrain

logger = logging.getLogger(__name__)

# what the sweep reads from a trained project (catalogue entries)
INPUTS = ("emoji_catalogue", "caption_corpus", "caption_features", "caption_targets", "tokenizer", "llm",
          "clip_tokenizer", "clip_model", "clip_image_processor", "eval_items", "eval_utility")


def held_out_scores(head, cls_features: torch.Tensor, patch_features: torch.Tensor, targets: torch.Tensor,
                    background: bool) -> dict:
    """The head's picks against the truth: the first object of single-object scenes, the count (filled object
    slots), the background (its last slot, if it has one) and every slot right."""
    with torch.no_grad():
        picks = head.picks(head.eval()(cls_features.float(), patch_features.float()))
    objects = slice(0, picks.shape[1] - background)
    single = targets[:, 1] == head.empty
    counted = (picks[:, objects] != head.empty).sum(1) == (targets[:, objects] != head.empty).sum(1)
    scores = {"name_single": float((picks[single, 0] == targets[single, 0]).float().mean()),
              "count": float(counted.float().mean()), "every_slot": float((picks == targets).all(1).float().mean()),
              "scenes": len(targets)}
    if background:
        scores["background"] = float((picks[:, -1] == targets[:, -1]).float().mean())
    return scores


def name_head_sweep(inputs: dict, params: dict, head_inputs: list[str], hidden: list[int],
                    steps: list[int]) -> pd.DataFrame:
    """One row per (inputs, hidden, steps): the head's training time and its held-out scores on every catalogue
    emoji alone (`eval_items`) and on the held-out neutral scenes of one to three objects (`eval_utility`)."""
    nodes = pretrain.create_pipeline(params).only_nodes("run_settings", "stage1_data", "name_vocabulary",
                                                        "model_inputs", "qmllm.model_config", "name_head")
    vocabulary = run_in_memory(pretrain.create_pipeline(params).only_nodes("name_vocabulary"), inputs,
                               params)["name_vocabulary"]
    ids = dict(zip(inputs["emoji_catalogue"]["name"], inputs["emoji_catalogue"]["item_id"], strict=True))
    held_out = {}
    for split in ("eval_items", "eval_utility"):
        scenes = inputs[split].drop_duplicates("scene_id").reset_index(drop=True)
        cached = run_in_memory(features.create_pipeline().only_nodes("extract_caption_features"),
                               {**inputs, "caption_corpus": scenes}, params)["caption_features"]
        head = params["pretrain"]["name_head"]
        truth = slot_targets([[ids[name] for name in objects] for objects in scenes["objects"]],
                             vocabulary["item_ids"], head["slots"],
                             list(scenes["background"]) if head["background"] else None, vocabulary["backgrounds"])
        held_out[split] = (cached, truth)
    rows = []
    for head_input, width, length in itertools.product(head_inputs, hidden, steps):
        with tempfile.TemporaryDirectory(prefix="name-head-") as scratch:  # never resume the real run's checkpoint
            setting = with_overrides(params, **{"pretrain.name_head.inputs": head_input,
                                                "pretrain.name_head.hidden": width,
                                                "pretrain.name_head.training.steps": length,
                                                "checkpoint_dir": scratch})
            started = time.perf_counter()
            trained = run_in_memory(nodes, inputs, setting)
            seconds = time.perf_counter() - started
        head = NameHead.from_config(QMLLMConfig.from_dict(trained["qmllm.qmllm_config"]))
        head.load_state_dict(trained["name_head_weights"])
        row = {"inputs": head_input, "hidden": width, "steps": length, "seconds": round(seconds, 1)}
        for split, (cached, truth) in held_out.items():
            scores = held_out_scores(head, cached["head_cls"], cached["patches"], truth,
                                     bool(setting["pretrain"]["name_head"]["background"]))
            row.update({f"{split}.{key}": value for key, value in scores.items()})
        logger.info("name head levers: %s", row)
        rows.append(row)
    return pd.DataFrame(rows)
