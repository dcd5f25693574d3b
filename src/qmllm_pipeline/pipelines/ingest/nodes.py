"""Nodes of the `ingest` pipeline: read real data into the same catalogue entries the `data` pipeline writes."""

from __future__ import annotations

import logging

import pandas as pd

from qmllm_pipeline.loaders import load_dmap_folder, load_llava_json

logger = logging.getLogger(__name__)


def ingest_captions(params: dict) -> tuple[pd.DataFrame, dict]:
    """Stage-1 image-caption pairs from a LLaVA-format JSON (e.g. LCS-558K's blip_laion_cc_sbu_558k.json)."""
    frame, report = load_llava_json(params["captions_json"], params["image_folder"], params["on_bad_input"],
                                    params["max_image_pixels"])
    frame = frame.dropna(subset=["image"]).rename(columns={"id": "scene_id"})
    logger.info("ingested %d caption pairs, skipped %d", len(frame), len(report.skipped))
    return frame[["scene_id", "image", "caption"]], report.as_dict()


def ingest_dialogs(params: dict) -> tuple[pd.DataFrame, dict]:
    """Stage-2 dialogs from a LLaVA-format JSON (e.g. llava_v1_5_mix665k.json); text-only records keep image None."""
    frame, report = load_llava_json(params["dialogs_json"], params["image_folder"], params["on_bad_input"],
                                    params["max_image_pixels"])
    logger.info("ingested %d dialogs, skipped %d", len(frame), len(report.skipped))
    return frame[["id", "image", "conversations"]], report.as_dict()


def ingest_dmap(params: dict) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """D_map from `<root>/<category>/*`, split per category into D_map and a validation part (for tau)."""
    frame, report = load_dmap_folder(params["dmap_folder"], params["on_bad_input"], params["max_image_pixels"],
                                     category_aliases=params.get("category_aliases"))
    validation = (frame.groupby("category", group_keys=False)
                  .sample(frac=params["validation_fraction"], random_state=params["seed"]))
    dmap = frame.drop(index=validation.index)
    logger.info("ingested D_map: %s", frame.groupby("category").size().to_dict())
    return dmap.reset_index(drop=True), validation.reset_index(drop=True), report.as_dict()


def ingest_evaluation_images(params: dict) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """Held-out evaluation images from `<root>/<category>/*`: toxic ones and neutral ones."""
    frame, report = load_dmap_folder(params["eval_folder"], params["on_bad_input"], params["max_image_pixels"],
                                     category_aliases=params.get("category_aliases"))
    frame["difficulty"] = "real"
    return frame[frame["toxic"]].reset_index(drop=True), frame[~frame["toxic"]].reset_index(drop=True), report.as_dict()


def merge_reports(captions: dict, dialogs: dict, dmap: dict, evaluation: dict) -> dict:
    return {"captions": captions, "dialogs": dialogs, "dmap": dmap, "evaluation": evaluation,
            "skipped_total": sum(r["skipped_count"] for r in (captions, dialogs, dmap, evaluation))}
