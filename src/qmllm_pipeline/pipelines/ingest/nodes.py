"""Nodes of the `ingest` pipeline: read real data into the same catalogue entries the `data` pipeline writes,
in the one schema of `qmllm_pipeline.schema` (checked before anything is saved)."""

from __future__ import annotations

import logging

import pandas as pd

from qmllm_pipeline.loaders import load_dmap_folder, load_llava_json
from qmllm_pipeline.schema import check_table

logger = logging.getLogger(__name__)


def ingest_captions(params: dict) -> tuple[pd.DataFrame, dict]:
    """Stage-1 image-caption pairs from a LLaVA-format JSON (e.g. LCS-558K's blip_laion_cc_sbu_558k.json)."""
    frame, report = load_llava_json(params["captions_json"], params["image_folder"], params["on_bad_input"],
                                    params["max_image_pixels"])
    frame = frame.dropna(subset=["image"]).rename(columns={"id": "scene_id"}).reset_index(drop=True)
    frame["objects"] = [[] for _ in range(len(frame))]  # real captions name no structured objects
    frame["background"] = ""
    logger.info("ingested %d caption pairs, skipped %d", len(frame), len(report.skipped))
    columns = ["scene_id", "image", "caption", "objects", "background"]
    return check_table(frame[columns], "caption_corpus", "ingest"), report.as_dict()


def ingest_dialogs(params: dict) -> tuple[pd.DataFrame, dict]:
    """Stage-2 dialogs from a LLaVA-format JSON (e.g. llava_v1_5_mix665k.json). Records without an image are
    left out (counted in the report as `text_only`): stage 2 replays text from `text_corpus`."""
    frame, report = load_llava_json(params["dialogs_json"], params["image_folder"], params["on_bad_input"],
                                    params["max_image_pixels"])
    with_image = frame["image"].notna()
    frame = frame[with_image].reset_index(drop=True)
    frame["turn_kinds"] = [["conversation"] * (len(turns) // 2) for turns in frame["conversations"]]
    logger.info("ingested %d dialogs, skipped %d, left out %d text-only", len(frame), len(report.skipped),
                int((~with_image).sum()))
    columns = ["id", "image", "conversations", "turn_kinds"]
    return check_table(frame[columns], "dialogs", "ingest"), {**report.as_dict(), "text_only": int((~with_image).sum())}


def ingest_dmap(params: dict) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """D_map from `<root>/<category>/*`, split per category into D_map and a validation part (for tau)."""
    frame, report = load_dmap_folder(params["dmap_folder"], params["on_bad_input"], params["max_image_pixels"],
                                     category_aliases=params.get("category_aliases"))
    validation = (frame.groupby("category", group_keys=False)
                  .sample(frac=params["validation_fraction"], random_state=params["seed"]))
    dmap = frame.drop(index=validation.index)
    logger.info("ingested D_map: %s", frame.groupby("category").size().to_dict())
    return (check_table(dmap.reset_index(drop=True).assign(difficulty="real"), "dmap", "ingest"),
            check_table(validation.reset_index(drop=True).assign(difficulty="real"), "dmap_validation", "ingest"),
            report.as_dict())


def ingest_evaluation_images(params: dict) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """Held-out evaluation images from `<root>/<category>/*`: toxic ones and neutral ones."""
    frame, report = load_dmap_folder(params["eval_folder"], params["on_bad_input"], params["max_image_pixels"],
                                     category_aliases=params.get("category_aliases"))
    frame["difficulty"] = "real"
    toxic, neutral = frame[frame["toxic"]].reset_index(drop=True), frame[~frame["toxic"]].reset_index(drop=True)
    return check_table(toxic, "eval_toxic", "ingest"), check_table(neutral, "eval_neutral", "ingest"), report.as_dict()


def merge_reports(captions: dict, dialogs: dict, dmap: dict, evaluation: dict) -> dict:
    return {"captions": captions, "dialogs": dialogs, "dmap": dmap, "evaluation": evaluation,
            "skipped_total": sum(r["skipped_count"] for r in (captions, dialogs, dmap, evaluation))}
