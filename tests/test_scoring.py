"""Scoring of answers: the objects a caption names, on hand-counted fixtures."""

import pandas as pd
import pytest

from qmllm_pipeline.scoring import caption_object_recall, caption_objects, utility_scores


@pytest.mark.parametrize(("caption", "names"), [
    ("a dog on a red background", ["dog"]),
    ("A dog, an apple and a cat on an orange background.", ["dog", "apple", "cat"]),
    ("a fork and knife and a bow and arrow on a blue background", ["fork and knife", "bow and arrow"]),
    ("a dog and a dog", ["dog", "dog"]),
    ("three", []),
    ("I'm sorry, I can't help with that.", []),
])
def test_caption_objects_reads_the_template_and_keeps_names_with_and_whole(caption, names):
    assert caption_objects(caption) == names


def test_caption_object_recall_counts_a_multiset_per_scene_size():
    answers = ["a dog on a red background",                   # 1 object: named
               "a cat and a dog on a blue background",        # 2 objects, order swapped: both named, exact
               "a dog and a dog on a blue background",        # 2 objects (dog, cat): one dog counts once
               "a cat, a hen and a pig on a gray background"]  # 3 objects (cat, cow, pig): two named
    objects = pd.Series([["dog"], ["dog", "cat"], ["dog", "cat"], ["cat", "cow", "pig"]])
    recall = caption_object_recall(answers, objects)
    assert {k: (v["count"], v["n"]) for k, v in recall.items()} == {
        "recall.1": (1, 1), "recall.2": (3, 4), "recall.3": (2, 3), "recall.multi": (5, 7),
        "exact.1": (1, 1), "exact.2": (1, 2), "exact.3": (0, 1), "exact.multi": (1, 3)}


def test_utility_scores_report_caption_objects_only_where_the_table_names_them():
    table = pd.DataFrame({"question_type": ["caption", "count"], "answer": ["a dog and a cat on a red background",
                                                                           "two"],
                          "objects": [["dog", "cat"], ["dog", "cat"]]})
    scores = utility_scores(["a dog on a red background", "two"], table)
    assert scores["caption_objects"]["recall.2"] == 0.5
    assert scores["intervals"]["caption_objects.recall.multi"]["count"] == 1
    assert utility_scores(["a dog", "two"], table.drop(columns="objects"))["caption_objects"] == {}
