import pandas as pd
import pytest

from qmllm_pipeline.world.catalogue import TOXIC_CATEGORIES, CatalogueError, validate_catalogue
from qmllm_pipeline.world.render import default_font_path


def test_shipped_catalogue_meets_the_world_spec(catalogue):
    toxic = catalogue[catalogue["toxic"]]
    assert len(toxic) >= 30
    per_category = toxic.groupby("category").size()
    assert set(per_category.index) == set(TOXIC_CATEGORIES)
    assert per_category.min() >= 2
    neutral = catalogue[~catalogue["toxic"]]
    assert 200 <= len(neutral) <= 400
    hard = set(catalogue.loc[catalogue["hard_negative"], "name"])
    assert {"fork and knife", "glass of milk", "water droplet", "hammer", "scissors"} <= hard
    assert list(catalogue["item_id"]) == list(range(len(catalogue)))


def _with_row(raw: pd.DataFrame, **row) -> pd.DataFrame:
    base = {"codepoints": "1F436", "name": "dog", "category": "neutral", "group": "animal", "hard_negative": "false"}
    return pd.concat([raw, pd.DataFrame([{**base, **row}])], ignore_index=True)


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"name": "second dog"}, "duplicate emoji, first listed in row"),
        ({"codepoints": "1F99E"}, "duplicate name"),
        ({"codepoints": "1F99E", "name": "lobster", "category": "seafood"}, "unknown category 'seafood'"),
        ({"codepoints": "EAAA", "name": "nothing"}, "draws no colour glyph"),
        ({"codepoints": "1F99E-1F3FB", "name": "lobster with skin tone"}, "draws no colour glyph"),
        ({"codepoints": "not-hex", "name": "broken"}, "codepoints must be hex"),
        ({"codepoints": "1F99E", "name": "lobster", "hard_negative": "maybe"}, "hard_negative must be true or false"),
        ({"codepoints": "1F99E", "name": "lobster", "category": "weapon", "hard_negative": "true"},
         "only neutral entries can be hard negatives"),
    ],
)
def test_bad_entries_are_named(raw_catalogue, row, message):
    bad = _with_row(raw_catalogue, **row)
    with pytest.raises(CatalogueError, match=message) as error:
        validate_catalogue(bad, default_font_path(), source="test.csv")
    assert f"test.csv, row {len(bad)}" in str(error.value)


def test_missing_column_and_missing_toxic_category(raw_catalogue):
    with pytest.raises(CatalogueError, match="missing column"):
        validate_catalogue(raw_catalogue.drop(columns=["group"]), default_font_path())
    no_blood = raw_catalogue[raw_catalogue["category"] != "blood"]
    with pytest.raises(CatalogueError, match="blood"):
        validate_catalogue(no_blood, default_font_path())
