"""The real configuration's loaders on files the tests create, including every bad-input case."""

import json
import re
from pathlib import Path

import pandas as pd
import pytest
from kedro.io import DataCatalog, DatasetError, MemoryDataset
from kedro.runner import SequentialRunner
from PIL import Image

from qmllm_pipeline.datasets import AtomicParquetDataset, atomic
from qmllm_pipeline.loaders import BadInputError, load_dmap_folder, load_llava_json, open_image_checked
from qmllm_pipeline.pipelines import ingest
from qmllm_pipeline.world.render import image_from_png

LIMIT = 1_000_000


def _save(image: Image.Image, path: Path, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **kwargs)
    return path


def _good(path: Path, colour=(200, 30, 30)) -> Path:
    return _save(Image.new("RGB", (16, 12), colour), path)


def _truncated(path: Path) -> Path:
    _save(Image.effect_noise((64, 64), 50).convert("RGB"), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


BAD_FILES = {
    "missing": (lambda p: p, "file not found"),
    "zero bytes": (lambda p: (p.write_bytes(b""), p)[1], r"empty file \(0 bytes\)"),
    "not an image": (lambda p: (p.write_text("just some text"), p)[1], "not a recognised image format"),
    "random bytes": (lambda p: (p.write_bytes(bytes(range(256)) * 4), p)[1], "not a recognised image format"),
    "truncated": (_truncated, "truncated or corrupt image"),
    "decompression bomb": (lambda p: _save(Image.new("L", (1200, 1000)), p),
                           r"1200x1000 pixels exceeds the limit of 1000000 \(possible decompression bomb\)"),
    "a directory": (lambda p: (p.mkdir(), p)[1], "is a directory"),
}


@pytest.mark.parametrize("case", BAD_FILES)
def test_bad_image_file_is_named_with_its_problem(tmp_path, case):
    make, problem = BAD_FILES[case]
    path = make(tmp_path / "image.png")
    with pytest.raises(BadInputError, match=problem) as error:
        open_image_checked(path, LIMIT)
    assert str(error.value).startswith(str(path))


@pytest.mark.parametrize(
    ("mode", "save_args"),
    [("L", {}), ("LA", {}), ("RGBA", {}), ("CMYK", {"format": "JPEG"}), ("P", {}), ("P", {"transparency": 0}),
     ("I;16", {}), ("1", {})],
)
def test_unusual_modes_become_rgb(tmp_path, mode, save_args):
    image = Image.new("RGB", (8, 8), (10, 200, 90)).convert(mode)
    suffix = ".jpg" if save_args.get("format") == "JPEG" else ".png"
    path = _save(image, tmp_path / f"image{suffix}", **save_args)
    loaded = open_image_checked(path, LIMIT)
    assert loaded.mode == "RGB" and loaded.size == (8, 8)


def test_transparency_is_composited_on_white(tmp_path):
    path = _save(Image.new("RGBA", (4, 4), (0, 0, 0, 0)), tmp_path / "clear.png")
    assert open_image_checked(path, LIMIT).getpixel((0, 0)) == (255, 255, 255)


def _llava_folder(tmp_path: Path) -> tuple[Path, Path]:
    images = tmp_path / "images"
    _good(images / "a.jpg")
    _good(images / "sub" / "b.png", colour=(0, 0, 255))
    _truncated(images / "broken.png")
    records = [
        {"id": "1", "image": "a.jpg", "conversations": [{"from": "human", "value": "<image>\nDescribe."},
                                                        {"from": "gpt", "value": "a red square"}]},
        {"id": "2", "image": "sub/b.png", "conversations": [{"from": "human", "value": "<image>"},
                                                            {"from": "gpt", "value": "a blue square"}]},
        {"id": "3", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
        {"id": "4", "image": "missing.jpg", "conversations": [{"from": "human", "value": "<image>"},
                                                              {"from": "gpt", "value": "x"}]},
        {"id": "5", "image": "broken.png", "conversations": [{"from": "human", "value": "<image>"},
                                                             {"from": "gpt", "value": "x"}]},
        {"id": "6", "image": "a.jpg"},
        {"id": "7", "image": "a.jpg", "conversations": [{"from": "human", "value": "no placeholder"},
                                                        {"from": "gpt", "value": "x"}]},
        "not an object",
    ]
    path = tmp_path / "data.json"
    path.write_text(json.dumps(records))
    return path, images


def test_llava_json_skip_mode_counts_every_bad_record(tmp_path):
    path, images = _llava_folder(tmp_path)
    frame, report = load_llava_json(path, images, on_bad_input="skip", max_pixels=LIMIT)
    assert list(frame["id"]) == ["1", "2", "3"]
    assert frame["image"].iloc[2] is None
    assert image_from_png(frame["image"].iloc[1]).getpixel((0, 0)) == (0, 0, 255)
    assert list(frame["caption"]) == ["a red square", "a blue square", "Hello"]
    problems = [s["problem"] for s in report.as_dict()["skipped"]]
    assert report.as_dict()["skipped_count"] == 5
    assert any("file not found" in p for p in problems) and any("truncated" in p for p in problems)
    assert any("'conversations'" in p for p in problems) and any("placeholder" in p for p in problems)
    assert any("JSON object" in p for p in problems)


def test_llava_json_error_mode_stops_at_the_first_bad_record(tmp_path):
    path, images = _llava_folder(tmp_path)
    with pytest.raises(BadInputError, match="missing.jpg: file not found"):
        load_llava_json(path, images, on_bad_input="error")


@pytest.mark.parametrize(
    ("text", "message"),
    [('[{"id": 1,}]', "malformed JSON at line 1, column"), ('{"id": 1}', "expected a JSON list"),
     ("", "malformed JSON")],
)
def test_malformed_json_always_raises(tmp_path, text, message):
    path = tmp_path / "data.json"
    path.write_text(text)
    for mode in ("error", "skip"):
        with pytest.raises(BadInputError, match=message) as error:
            load_llava_json(path, tmp_path, on_bad_input=mode)
        assert str(error.value).startswith(str(path))


Q, A = {"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "a cat"}


@pytest.mark.parametrize(("record", "problem"), [
    ({"id": "two-images", "image": "a.jpg",
      "conversations": [Q, A, {"from": "human", "value": "<image> and now?"}, A]}, "2 <image> placeholders"),
    ({"id": "no-image", "conversations": [Q, A]}, "has <image> in its turns but no image"),
    ({"id": "role", "image": "a.jpg", "conversations": [Q, {"from": "assistant", "value": "x"}]},
     "turn 1 is from 'assistant'; the roles are ['human', 'gpt']"),
    ({"id": "order", "image": "a.jpg", "conversations": [{"from": "gpt", "value": "<image> hi"}, Q]},
     "turn 0 is from 'gpt', expected 'human'"),
    ({"id": "one-turn", "image": "a.jpg", "conversations": [Q]}, "1 turns: the last question has no answer"),
    ({"id": "odd", "image": "a.jpg", "conversations": [Q, A, {"from": "human", "value": "and?"}]},
     "3 turns: the last question has no answer"),
    ({"id": "empty-answer", "image": "a.jpg", "conversations": [Q, {"from": "gpt", "value": "  "}]},
     "an answer is empty"),
    ({"id": "answer-placeholder", "image": "a.jpg",
      "conversations": [Q, {"from": "gpt", "value": "<image>"}]}, "2 <image> placeholders"),
])
def test_a_malformed_dialog_record_is_refused_at_ingest_with_its_id(tmp_path, record, problem):
    """Refused when read, naming the record (position and id), not later in training or scoring."""
    images = tmp_path / "images"
    _good(images / "a.jpg")
    path = tmp_path / "dialogs.json"
    path.write_text(json.dumps([{"id": "fine", "image": "a.jpg", "conversations": [Q, A]}, record]))
    with pytest.raises(BadInputError, match=re.escape(f"record 1 (id {record['id']!r}): {problem}")):
        load_llava_json(path, images, on_bad_input="error")
    frame, report = load_llava_json(path, images, on_bad_input="skip")
    assert list(frame["id"]) == ["fine"] and report.as_dict()["skipped_count"] == 1


def test_an_empty_instruction_csv_is_named(tmp_path):
    from qmllm_pipeline.loaders import load_instructions

    path = tmp_path / "harmful.csv"
    path.write_text("")
    with pytest.raises(BadInputError, match="harmful.csv: empty CSV file"):
        load_instructions(path, "goal")


def test_missing_json_and_unknown_policy(tmp_path):
    with pytest.raises(BadInputError, match="file not found"):
        load_llava_json(tmp_path / "nope.json", tmp_path)
    with pytest.raises(ValueError, match="on_bad_input must be"):
        load_llava_json(tmp_path / "nope.json", tmp_path, on_bad_input="ignore")


def _dmap_folder(tmp_path: Path) -> Path:
    root = tmp_path / "dmap"
    _good(root / "gun" / "1.jpg")
    _good(root / "weapon" / "2.png")
    _good(root / "neutral" / "3.png")
    _save(Image.new("RGB", (4, 4)).convert("CMYK"), root / "tobacco" / "4.jpg", format="JPEG")
    (root / "neutral" / "notes.txt").write_text("not an image")
    (root / "neutral" / "empty.jpg").write_bytes(b"")
    _good(root / "puppies" / "5.png")
    (root / "README.md").write_text("stray")
    return root


def test_dmap_folder_skip_mode(tmp_path):
    frame, report = load_dmap_folder(_dmap_folder(tmp_path), on_bad_input="skip", max_pixels=LIMIT,
                                     category_aliases={"gun": "weapon"})
    assert sorted(frame["category"]) == ["neutral", "tobacco", "weapon", "weapon"]
    assert frame.set_index("category")["toxic"].to_dict() == {"neutral": False, "tobacco": True, "weapon": True}
    problems = {Path(s["file"]).name: s["problem"] for s in report.skipped}
    assert set(problems) == {"notes.txt", "empty.jpg", "puppies", "README.md"}
    assert "unknown category 'puppies'" in problems["puppies"]
    assert "not an image file" in problems["notes.txt"]


def test_dmap_folder_error_mode_names_the_file(tmp_path):
    root = _dmap_folder(tmp_path)
    with pytest.raises(BadInputError, match="README.md: stray file"):
        load_dmap_folder(root, on_bad_input="error", category_aliases={"gun": "weapon"})
    with pytest.raises(BadInputError, match="D_map folder not found"):
        load_dmap_folder(tmp_path / "nothing")


def test_a_failed_ingest_leaves_earlier_results_intact(tmp_path, monkeypatch):
    """Kedro saves nothing of a failed node, and what is saved is renamed into place when complete."""
    target = tmp_path / "out" / "dmap.parquet"
    dataset = AtomicParquetDataset(str(target))
    dataset.save(pd.DataFrame({"scene_id": ["old"], "category": ["neutral"]}))
    before = target.read_bytes()

    def write_half_then_fail(table, path, **kwargs):
        Path(path).write_bytes(b"PAR1 half a file")
        raise OSError("No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(atomic.pq, "write_table", write_half_then_fail)
        with pytest.raises(DatasetError, match="No space left"):
            dataset.save(pd.DataFrame({"scene_id": ["new"], "category": ["weapon"]}))
    assert target.read_bytes() == before and list(target.parent.iterdir()) == [target]

    root = _dmap_folder(tmp_path)
    params = {"dmap_folder": str(root), "on_bad_input": "error", "max_image_pixels": LIMIT,
              "category_aliases": {"gun": "weapon"}, "validation_fraction": 0.5, "seed": 0}
    catalog = DataCatalog({"dmap": dataset, "dmap_validation": MemoryDataset(), "ingest_dmap_report": MemoryDataset()})
    catalog["params:ingest"] = params
    dmap_only = ingest.create_pipeline().only_nodes("ingest_dmap")
    with pytest.raises(BadInputError, match="README.md"):
        SequentialRunner().run(dmap_only, catalog)
    assert target.read_bytes() == before
