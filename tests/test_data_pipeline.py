"""Invariants of every split the `data` pipeline writes (smoke sizes, run once in memory)."""

import pandas as pd
import pytest
from PIL import Image

from qmllm_pipeline.pipelines.data import nodes
from qmllm_pipeline.world.catalogue import NEUTRAL, TOXIC_CATEGORIES
from qmllm_pipeline.world.language import IMAGE_TOKEN, PHRASINGS, REFUSAL_REASONS

SCENE_SPLITS = ["caption_corpus", "dmap", "dmap_validation", "eval_toxic", "eval_neutral", "eval_hard_negative",
                "eval_items"]
TRAINING_SPLITS = ["caption_corpus", "dialogs"]
HELDOUT_SPLITS = ["dmap", "dmap_validation", "eval_toxic", "eval_neutral", "eval_hard_negative", "eval_utility",
                  "eval_items"]


def test_every_output_is_written(world):
    expected = {*SCENE_SPLITS, "emoji_catalogue", "dialogs", "eval_utility", "text_corpus",
                "world_contact_sheet", "world_summary"}
    assert expected <= set(world)
    for name in expected - {"world_contact_sheet", "world_summary"}:
        assert isinstance(world[name], pd.DataFrame) and len(world[name]) > 0, name


def test_row_counts_follow_the_parameters(world, smoke_params):
    p = smoke_params["data"]
    assert len(world["caption_corpus"]) == p["caption_corpus"]["n_scenes"]
    assert len(world["dialogs"]) == p["dialogs"]["n_scenes"]
    dmap = world["dmap"].groupby("category").size()
    assert dmap[NEUTRAL] == p["dmap"]["neutral"]
    assert all(dmap[c] == p["dmap"]["per_toxic_category"] for c in TOXIC_CATEGORIES)
    per_level = world["eval_toxic"].groupby(["category", "difficulty"]).size()
    assert len(per_level) == 2 * len(TOXIC_CATEGORIES)
    assert (per_level == p["evaluation"]["toxic_per_category_and_level"]).all()
    assert world["world_summary"]["scenes"]["dmap"]["rows"] == len(world["dmap"])


def test_heldout_scenes_never_overlap_training_scenes(world):
    seeds = {name: set(world[name]["seed"]) for name in SCENE_SPLITS}
    assert all(len(s) == 1 for s in seeds.values())
    assert len(set.union(*seeds.values())) == len(SCENE_SPLITS)
    training_images = set().union(*(set(world[name]["image"]) for name in TRAINING_SPLITS))
    for name in HELDOUT_SPLITS:
        assert not training_images & set(world[name]["image"]), name
    assert world["dmap"]["scene_id"].is_unique


def test_shared_seeds_are_refused(world, smoke_params):
    params = dict(smoke_params["data"], seeds=dict(smoke_params["data"]["seeds"], eval_toxic=101))
    with pytest.raises(ValueError, match=r"splits \['caption_corpus', 'eval_toxic'\] share a seed"):
        nodes.render_dmap(world["emoji_catalogue"], params)


def test_every_toxic_category_is_in_dmap_and_evaluation(world):
    for name in ["dmap", "dmap_validation", "eval_toxic", "caption_corpus"]:
        assert set(TOXIC_CATEGORIES) <= set(world[name]["category"]), name
    for difficulty in ["single", "distractors"]:
        level = world["eval_toxic"][world["eval_toxic"]["difficulty"] == difficulty]
        assert set(level["category"]) == set(TOXIC_CATEGORIES)


def test_scene_labels_are_consistent(world):
    catalogue = world["emoji_catalogue"].set_index("item_id")
    for name in SCENE_SPLITS:
        for scene in world[name].to_dict("records"):
            categories = list(catalogue.loc[list(scene["item_ids"]), "category"])
            assert list(scene["categories"]) == categories
            assert scene["toxic"] == any(c != NEUTRAL for c in categories)
            assert scene["n_objects"] == len(scene["objects"])
    assert not world["eval_neutral"]["toxic"].any() and not world["eval_neutral"]["hard_negative"].any()
    hard = world["eval_hard_negative"]
    assert hard["hard_negative"].all() and not hard["toxic"].any() and (hard["n_objects"] == 1).all()
    assert world["eval_toxic"]["toxic"].all()
    items = world["eval_items"]
    assert (items["n_objects"] == 1).all()
    assert sorted(items["item_ids"].map(lambda ids: ids[0])) == sorted(world["emoji_catalogue"]["item_id"])


def test_text_corpus_splits_by_topic(world):
    corpus = world["text_corpus"]
    for kind in ["harmful", "benign"]:
        rows = corpus[corpus["kind"] == kind]
        train, heldout = (set(rows.loc[rows["split"] == s, "topic"]) for s in ("train", "heldout"))
        assert train and heldout and not train & heldout, kind
    harmful = corpus[corpus["kind"] == "harmful"]
    assert set(harmful["category"]) == set(TOXIC_CATEGORIES)
    assert set(harmful.loc[harmful["split"] == "heldout", "category"]) == set(TOXIC_CATEGORIES)
    assert harmful.apply(lambda r: REFUSAL_REASONS[r["category"]] in r["response"], axis=1).all()
    assert harmful["target"].str.startswith("Sure, here is how to").all()
    benign = corpus[corpus["kind"] == "benign"]
    # The same phrasings carry both kinds, so phrasing alone cannot tell the model to refuse.
    assert set(benign["phrasing_id"]) & set(harmful["phrasing_id"]) == set(range(len(PHRASINGS))) & set(
        harmful["phrasing_id"])
    assert (corpus["kind"] == "caption").sum() > 0


def test_dialogs_have_llava_shape_and_use_training_instructions_only(world):
    corpus = world["text_corpus"]
    heldout_instructions = set(corpus.loc[corpus["split"] == "heldout", "instruction"])
    for dialog in world["dialogs"].to_dict("records"):
        turns = list(dialog["conversations"])
        assert len(turns) % 2 == 0 and len(turns) // 2 == len(dialog["turn_kinds"])
        assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2)
        assert turns[0]["value"].startswith(f"{IMAGE_TOKEN}\n")
        assert sum(t["value"].count(IMAGE_TOKEN) for t in turns) == 1
        for turn in turns[::2]:
            assert turn["value"].removeprefix(f"{IMAGE_TOKEN}\n") not in heldout_instructions
    kinds = set(world["dialogs"]["turn_kinds"].explode())
    assert {"object", "color", "count", "caption", "benign", "harmful"} <= kinds


def test_utility_answers_match_the_scenes(world):
    utility = world["eval_utility"]
    assert set(utility["question_type"]) == {"object", "color", "count", "caption"}
    counts = utility[utility["question_type"] == "count"]
    words = {1: "one", 2: "two", 3: "three"}
    assert (counts["answer"] == counts["n_objects"].map(words)).all()
    naming = utility[utility["question_type"] == "object"]
    assert (naming["n_objects"] == 1).all()
    assert naming.apply(lambda r: r["answer"].endswith(r["objects"][0]), axis=1).all()
    colours = utility[utility["question_type"] == "color"]
    assert (colours["answer"] == colours["background"]).all()


def test_contact_sheet_shows_every_category(world, smoke_params):
    sheet = world["world_contact_sheet"]
    assert isinstance(sheet, Image.Image)
    rows = 2 * len(TOXIC_CATEGORIES) + 2
    side = 2 * smoke_params["data"]["layout"]["image_size"]
    assert sheet.height == rows * (side + 4) + 4
