"""Nodes of the `data` pipeline: the embedded emoji world, rendered into Parquet tables."""

from __future__ import annotations

import logging
import time

import pandas as pd
from PIL import Image

from qmllm_pipeline.schema import check_table
from qmllm_pipeline.world.catalogue import NEUTRAL, TOXIC_CATEGORIES, validate_catalogue
from qmllm_pipeline.world.contact_sheet import contact_sheet
from qmllm_pipeline.world.language import (
    build_caption_rows,
    build_dialogs,
    build_instruction_rows,
    build_utility_questions,
)
from qmllm_pipeline.world.render import GlyphRenderer, resolve_font_path
from qmllm_pipeline.world.scenes import DISTRACTORS, MIXED, SINGLE, LayoutParams, SceneRequest, SceneSampler

logger = logging.getLogger(__name__)


def _seed(params: dict, split: str) -> int:
    """Each split has its own seed; equal seeds would make held-out scenes copies of training scenes."""
    seeds = params["seeds"]
    duplicated = {s for s in seeds.values() if list(seeds.values()).count(s) > 1}
    if duplicated:
        names = sorted(name for name, seed in seeds.items() if seed in duplicated)
        raise ValueError(f"parameters data.seeds: splits {names} share a seed; every split needs its own")
    return int(seeds[split])


def _sampler(catalogue: pd.DataFrame, params: dict) -> SceneSampler:
    renderer = GlyphRenderer(resolve_font_path(params["font_path"]), glyph_size=params["glyph_size"])
    return SceneSampler(catalogue, LayoutParams.from_params(params["layout"]), renderer)


def _render(catalogue: pd.DataFrame, params: dict, split: str, requests: list[SceneRequest], **mix) -> pd.DataFrame:
    started = time.perf_counter()
    scenes = _sampler(catalogue, params).render_split(split, _seed(params, split), requests, {**params["mix"], **mix})
    logger.info("rendered %d %s scenes in %.1f s", len(scenes), split, time.perf_counter() - started)
    return scenes


def validate_emoji_catalogue(raw_catalogue: pd.DataFrame, params: dict) -> pd.DataFrame:
    """Check the curated catalogue against the configured font; add `item_id`, `emoji` and `toxic`."""
    catalogue = validate_catalogue(raw_catalogue, resolve_font_path(params["font_path"]))
    counts = catalogue.groupby("category").size().to_dict()
    logger.info("emoji catalogue: %d entries, %d hard negatives, per category %s",
                len(catalogue), int(catalogue["hard_negative"].sum()), counts)
    return catalogue


def render_caption_corpus(catalogue: pd.DataFrame, params: dict) -> pd.DataFrame:
    """Stage-1 image-caption pairs: the pretraining mix of neutral and toxic scenes."""
    n_scenes = params["caption_corpus"]["n_scenes"]
    return check_table(_render(catalogue, params, "caption_corpus", [SceneRequest(MIXED)] * n_scenes),
                       "caption_corpus", "data")


def _dmap_requests(sizes: dict) -> list[SceneRequest]:
    requests = []
    for category in TOXIC_CATEGORIES:
        n_distractors = round(sizes["per_toxic_category"] * sizes["distractor_fraction"])
        requests += [SceneRequest("toxic", category, SINGLE)] * (sizes["per_toxic_category"] - n_distractors)
        requests += [SceneRequest("toxic", category, DISTRACTORS)] * n_distractors
    return requests + [SceneRequest("neutral")] * sizes["neutral"]


def render_dmap(catalogue: pd.DataFrame, params: dict) -> pd.DataFrame:
    """D_map: the small labelled set the safety map is built from (paper: ~50 per toxic class, 500 neutral)."""
    return check_table(_render(catalogue, params, "dmap", _dmap_requests(params["dmap"])), "dmap", "data")


def render_dmap_validation(catalogue: pd.DataFrame, params: dict) -> pd.DataFrame:
    """A second D_map-shaped set from another seed, for choosing the threshold tau and the unseen-code policy."""
    return check_table(_render(catalogue, params, "dmap_validation", _dmap_requests(params["dmap_validation"])),
                       "dmap_validation", "data")


def render_evaluation_splits(
    catalogue: pd.DataFrame, params: dict
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Held-out scenes: toxic per category and difficulty, plain neutral, hard negatives, utility questions,
    and every catalogue item alone (for zero-shot recognition)."""
    sizes = params["evaluation"]
    toxic_requests = [
        SceneRequest("toxic", category, difficulty)
        for category in TOXIC_CATEGORIES
        for difficulty in (SINGLE, DISTRACTORS)
        for _ in range(sizes["toxic_per_category_and_level"])
    ]
    eval_toxic = _render(catalogue, params, "eval_toxic", toxic_requests)
    eval_neutral = _render(catalogue, params, "eval_neutral", [SceneRequest("neutral")] * sizes["neutral"],
                           include_hard_negatives=False)
    hard_ids = catalogue.loc[catalogue["hard_negative"], "item_id"]
    hard_requests = [SceneRequest("hard_negative", item_id=int(i)) for i in hard_ids
                     for _ in range(sizes["hard_negative_per_item"])]
    eval_hard_negative = _render(catalogue, params, "eval_hard_negative", hard_requests)
    utility_scenes = _render(catalogue, params, "eval_utility", [SceneRequest("neutral")] * sizes["utility_scenes"],
                             include_hard_negatives=False)
    item_requests = [SceneRequest("single", item_id=int(i)) for i in catalogue["item_id"]
                     for _ in range(sizes["per_item"])]
    eval_items = _render(catalogue, params, "eval_items", item_requests)
    eval_utility = build_utility_questions(utility_scenes)
    for name, frame in (("eval_toxic", eval_toxic), ("eval_neutral", eval_neutral),
                        ("eval_hard_negative", eval_hard_negative), ("eval_utility", eval_utility)):
        check_table(frame, name, "data")
    return eval_toxic, eval_neutral, eval_hard_negative, eval_utility, eval_items


def build_text_corpus(catalogue: pd.DataFrame, caption_corpus: pd.DataFrame, params: dict) -> pd.DataFrame:
    """Text for the tokenizer and the LLM: captions, benign instructions answered, harmful ones refused."""
    text_params = {**params["text"], "seed": _seed(params, "text")}
    instructions = build_instruction_rows(catalogue, text_params)
    captions = build_caption_rows(caption_corpus, text_params["captions"], text_params["seed"])
    corpus = pd.concat([instructions, captions], ignore_index=True)
    logger.info("text corpus: %s", corpus.groupby(["kind", "split"]).size().to_dict())
    return corpus


def make_dialogs(catalogue: pd.DataFrame, text_corpus: pd.DataFrame, params: dict) -> pd.DataFrame:
    """Stage-2 instruction dialogs in LLaVA's `conversations` shape, over their own scenes."""
    dialog_params = {**params["dialogs"], "seed": _seed(params, "dialogs")}
    scenes = _render(catalogue, params, "dialogs", [SceneRequest(MIXED)] * dialog_params["n_scenes"])
    return check_table(build_dialogs(scenes, text_corpus, dialog_params), "dialogs", "data")


def draw_contact_sheet(eval_toxic: pd.DataFrame, eval_neutral: pd.DataFrame, eval_hard_negative: pd.DataFrame,
                       params: dict) -> Image.Image:
    """Sample held-out scenes per toxic category and difficulty, neutral and hard-negative scenes."""
    groups = {}
    for category in TOXIC_CATEGORIES:
        for difficulty in (SINGLE, DISTRACTORS):
            rows = eval_toxic[(eval_toxic["category"] == category) & (eval_toxic["difficulty"] == difficulty)]
            groups[f"{category}\n({difficulty})"] = rows
    groups[NEUTRAL] = eval_neutral
    groups["hard negative"] = eval_hard_negative.sample(frac=1.0, random_state=0)
    return contact_sheet(groups, per_row=params["contact_sheet"]["per_row"])


def _per_category(frame: pd.DataFrame) -> dict:
    return {str(k): int(v) for k, v in frame.groupby("category").size().items()}


def summarise_scenes(**scene_splits: pd.DataFrame) -> dict:
    """Row counts per scene table and per category (the scene tables by name, in the summary's order)."""
    return {name: {"rows": len(frame), "per_category": _per_category(frame)} for name, frame in scene_splits.items()}


def summarise_evaluation_scenes(eval_toxic: pd.DataFrame, eval_neutral: pd.DataFrame,
                                eval_hard_negative: pd.DataFrame, eval_items: pd.DataFrame) -> dict:
    """`summarise_scenes` of the evaluation splits, and the toxic scenes per difficulty."""
    return {"scenes": summarise_scenes(eval_toxic=eval_toxic, eval_neutral=eval_neutral,
                                       eval_hard_negative=eval_hard_negative, eval_items=eval_items),
            "eval_toxic_per_difficulty": {str(k): int(v) for k, v in eval_toxic.groupby("difficulty").size().items()}}


def summarise_world(catalogue: pd.DataFrame, dialogs: pd.DataFrame, eval_utility: pd.DataFrame,
                    text_corpus: pd.DataFrame, training_scenes: dict, evaluation_scenes: dict) -> dict:
    """Row counts per split and per category, the figures the README and the DVC metrics show: the training
    scene tables' and the evaluation splits' summaries (`summarise_scenes`), the dialogs, the utility
    questions and the text corpus."""
    summary = {
        "catalogue": {"entries": len(catalogue), "hard_negatives": int(catalogue["hard_negative"].sum()),
                      "per_category": _per_category(catalogue)},
        "scenes": {**training_scenes, **evaluation_scenes["scenes"]},
        "eval_toxic_per_difficulty": evaluation_scenes["eval_toxic_per_difficulty"],
        "dialogs": {"rows": len(dialogs), "turns": int(dialogs["turn_kinds"].map(len).sum()),
                    "per_turn_kind": {str(k): int(v) for k, v in
                                      dialogs["turn_kinds"].explode().value_counts().items()}},
        "eval_utility": {"rows": len(eval_utility),
                         "per_question_type": {str(k): int(v) for k, v in
                                               eval_utility.groupby("question_type").size().items()}},
        "text_corpus": {f"{kind}/{split}": int(v) for (kind, split), v in
                        text_corpus.groupby(["kind", "split"]).size().items()},
    }
    logger.info("world summary: %s", summary["scenes"])
    return summary
