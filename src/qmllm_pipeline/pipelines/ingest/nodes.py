"""Nodes of the `ingest` pipeline: read real data into the same catalogue entries the `data` pipeline writes,
in the one schema of `qmllm_pipeline.schema` (checked before anything is saved)."""

from __future__ import annotations

import logging

import pandas as pd

from qmllm_pipeline.loaders import (
    MANIFEST_FIELDS,
    LoadReport,
    load_dmap_folder,
    load_instructions,
    load_llava_json,
)
from qmllm_pipeline.schema import SCHEMAS, check_table
from qmllm_pipeline.world.catalogue import CATEGORIES, NEUTRAL

logger = logging.getLogger(__name__)


def _image_columns(params: dict) -> list[str]:
    return ["image"] if params["embed_images"] else list(MANIFEST_FIELDS)


def _corpus_json(params: dict, key: str) -> tuple[pd.DataFrame, LoadReport]:
    """A LLaVA-format JSON of the corpus (`embed_images`: PNG bytes in the table; else a manifest of the files)."""
    return load_llava_json(params[key], params["image_folder"], params["on_bad_input"], params["max_image_pixels"],
                           params.get("image_size"), embed_images=params["embed_images"])


def ingest_captions(params: dict) -> tuple[pd.DataFrame, dict]:
    """Stage-1 image-caption pairs from a LLaVA-format JSON (e.g. LCS-558K's blip_laion_cc_sbu_558k.json)."""
    frame, report = _corpus_json(params, "captions_json")
    frame = frame.dropna(subset=[_image_columns(params)[0]]).rename(columns={"id": "scene_id"}).reset_index(drop=True)
    frame["objects"] = [[] for _ in range(len(frame))]  # real captions name no structured objects
    frame["background"] = ""
    logger.info("ingested %d caption pairs, skipped %d", len(frame), len(report.skipped))
    columns = ["scene_id", *_image_columns(params), "caption", "objects", "background"]
    return check_table(frame[columns], "caption_corpus", "ingest"), report.as_dict()


def ingest_dialogs(params: dict) -> tuple[pd.DataFrame, dict]:
    """Stage-2 dialogs from a LLaVA-format JSON (e.g. llava_v1_5_mix665k.json). Records without an image are
    left out (counted in the report as `text_only`): stage 2 replays text from `text_corpus`."""
    frame, report = _corpus_json(params, "dialogs_json")
    with_image = frame[_image_columns(params)[0]].notna()
    frame = frame[with_image].reset_index(drop=True)
    if not params["embed_images"]:  # the text-only records' missing sizes made these columns float
        frame = frame.astype({"image_size": int, "image_bytes": int})
    frame["turn_kinds"] = [["conversation"] * (len(turns) // 2) for turns in frame["conversations"]]
    logger.info("ingested %d dialogs, skipped %d, left out %d text-only", len(frame), len(report.skipped),
                int((~with_image).sum()))
    columns = ["id", *_image_columns(params), "conversations", "turn_kinds"]
    return check_table(frame[columns], "dialogs", "ingest"), {**report.as_dict(), "text_only": int((~with_image).sum())}


def ingest_dmap(params: dict) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """D_map from `<root>/<category>/*`, split per category into D_map and a validation part (for tau)."""
    frame, report = load_dmap_folder(params["dmap_folder"], params["on_bad_input"], params["max_image_pixels"],
                                     category_aliases=params.get("category_aliases"),
                                     image_size=params.get("image_size"))
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
                                     category_aliases=params.get("category_aliases"),
                                     image_size=params.get("image_size"))
    frame["difficulty"] = "real"
    toxic, neutral = frame[frame["toxic"]].reset_index(drop=True), frame[~frame["toxic"]].reset_index(drop=True)
    return check_table(toxic, "eval_toxic", "ingest"), check_table(neutral, "eval_neutral", "ingest"), report.as_dict()


def ingest_instructions(params: dict) -> pd.DataFrame:
    """The harmful instructions of the jailbreak evaluation (`harmful_instructions`: one a line, or a CSV
    with `instruction_column` and optionally `target_column`) as the text corpus the chain reads: each
    `kind: harmful`, split into `train` (what a universal image is crafted on) and `heldout` (what every
    attack is judged on) by `heldout_fraction`. Real data brings no refusals to replay in stage 2
    (`finetune.data.text_replay_fraction` is 0 in this environment)."""
    frame = load_instructions(params["harmful_instructions"], params.get("instruction_column"),
                              params.get("target_column"), params["default_target"])
    heldout = frame.sample(frac=params["heldout_fraction"], random_state=params["seed"]).index
    corpus = pd.DataFrame({"kind": "harmful", "split": ["heldout" if i in heldout else "train" for i in frame.index],
                           "topic": frame["instruction"], "category": "", "phrasing_id": 0,
                           "instruction": frame["instruction"], "response": "", "target": frame["target"]})
    logger.info("ingested %d harmful instructions (%d held out)", len(corpus), len(heldout))
    return corpus


def ingest_utility(params: dict) -> tuple[pd.DataFrame, dict]:
    """Utility questions: the first question and answer of each record of a LLaVA-format JSON
    (`utility_json`), scored by word F1 against the reference answer (question type `caption`); empty
    without one (the utility rows of the report are then left out)."""
    empty = pd.DataFrame({column: pd.Series(dtype=object) for column in SCHEMAS["eval_utility"]})
    if not params.get("utility_json"):
        return check_table(empty, "eval_utility", "ingest"), {"source": None, "rows": 0, "skipped_count": 0}
    frame, report = load_llava_json(params["utility_json"], params["image_folder"], params["on_bad_input"],
                                    params["max_image_pixels"],
                                    params.get("image_size"))
    frame = frame.dropna(subset=["image"]).reset_index(drop=True)
    table = pd.DataFrame({"scene_id": frame["id"], "image": frame["image"], "question_type": "caption",
                          "question": [turns[0]["value"] for turns in frame["conversations"]],
                          "answer": [turns[1]["value"] for turns in frame["conversations"]]})
    return check_table(table, "eval_utility", "ingest"), report.as_dict()


def category_catalogue(params: dict) -> pd.DataFrame:
    """The categories the safety map and SafeCLIP tell apart, one entry each, named for CLIP's text side by
    `category_names` (real data has no item catalogue; this table takes the emoji catalogue's place)."""
    names = params["category_names"]
    missing = [category for category in CATEGORIES if category not in names]
    if missing:
        raise ValueError(f"ingest.category_names: no name for the categories {missing}")
    return pd.DataFrame({"item_id": range(len(CATEGORIES)), "codepoints": "", "emoji": "",
                         "name": [names[c] for c in CATEGORIES], "category": list(CATEGORIES),
                         "group": list(CATEGORIES), "hard_negative": False,
                         "toxic": [c != NEUTRAL for c in CATEGORIES]})


def no_items() -> pd.DataFrame:
    """Real data has no single-item scenes to name: the naming measurement is left out."""
    return pd.DataFrame({column: pd.Series(dtype=object) for column in
                         ("scene_id", "image", "item_ids", "objects", "toxic", "category", "difficulty")})


def no_hard_negatives(eval_neutral: pd.DataFrame) -> pd.DataFrame:
    """Real evaluation folders have no hard-negative split (the emoji world's look-alikes): an empty one."""
    return eval_neutral.iloc[:0].copy()


def merge_reports(captions: dict, dialogs: dict, dmap: dict, evaluation: dict, utility: dict) -> dict:
    return {"captions": captions, "dialogs": dialogs, "dmap": dmap, "evaluation": evaluation, "utility": utility,
            "skipped_total": sum(r["skipped_count"] for r in (captions, dialogs, dmap, evaluation, utility))}
