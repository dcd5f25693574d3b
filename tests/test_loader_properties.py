"""Property-based tests (hypothesis) of what reads untrusted input: any bytes, size, mode or format given to
the image reader the loaders and `qmllm check` share gives an RGB image or a `BadInputError`, never another
exception; the Python API reads an image file as the CLI does; any JSON given to the LLaVA loader gives a
table or a `BadInputError`."""

from __future__ import annotations

import io
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from qmllm_pipeline.images import to_rgb
from qmllm_pipeline.loaders import BadInputError, load_llava_json, open_image_checked

LIMIT = 64 * 64
EXAMPLES = int(os.environ.get("QMLLM_PROPERTY_EXAMPLES", "150"))  # more for a longer search
PROPERTY = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# (mode, the formats Pillow writes it in)
MODES = {"1": ("PNG", "BMP", "TIFF"), "L": ("PNG", "BMP", "TIFF", "JPEG", "GIF", "WEBP"), "LA": ("PNG", "TIFF"),
         "P": ("PNG", "BMP", "GIF", "TIFF"), "RGB": ("PNG", "BMP", "TIFF", "JPEG", "WEBP"),
         "RGBA": ("PNG", "TIFF", "WEBP"), "CMYK": ("JPEG", "TIFF"), "I;16": ("PNG", "TIFF"), "I": ("TIFF",),
         "F": ("TIFF",), "YCbCr": ("JPEG",)}


@st.composite
def images(draw) -> tuple[Image.Image, str]:
    mode = draw(st.sampled_from(sorted(MODES)))
    fmt = draw(st.sampled_from(MODES[mode]))
    width, height = draw(st.integers(1, 48)), draw(st.integers(1, 48))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    if mode in ("I;16",):
        image = Image.fromarray(rng.integers(0, 65536, (height, width), dtype=np.uint16))
    elif mode == "I":
        image = Image.fromarray(rng.integers(-(2**31), 2**31 - 1, (height, width), dtype=np.int32))
    elif mode == "F":
        values = rng.normal(0, 1e3, (height, width)).astype(np.float32)
        values[rng.random((height, width)) < 0.05] = np.nan
        image = Image.fromarray(values)
    else:
        image = Image.fromarray(rng.integers(0, 256, (height, width, 4), dtype=np.uint8), "RGBA").convert(mode)
        if mode == "P" and draw(st.booleans()):
            image.info["transparency"] = 0
    return image, fmt


def _encoded(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def _read(data: bytes, suffix: str = ".img") -> Image.Image | BadInputError:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"input{suffix}"
        path.write_bytes(data)
        try:
            return open_image_checked(path, LIMIT)
        except BadInputError as error:
            return error


@PROPERTY
@given(st.binary(max_size=4096))
def test_any_bytes_give_an_image_or_a_bad_input_error(data):
    result = _read(data)
    assert isinstance(result, BadInputError) or (result.mode == "RGB" and result.width * result.height <= LIMIT)


@PROPERTY
@given(images())
def test_any_mode_size_and_format_reads_as_rgb_of_its_size(drawn):
    image, fmt = drawn
    result = _read(_encoded(image, fmt))
    assert not isinstance(result, BadInputError), result
    assert result.mode == "RGB" and result.size == image.size


@PROPERTY
@given(images(), st.data())
def test_a_damaged_file_gives_an_image_or_a_bad_input_error(drawn, data):
    image, fmt = drawn
    encoded = bytearray(_encoded(image, fmt))
    if data.draw(st.booleans(), "truncate"):
        encoded = encoded[:data.draw(st.integers(0, max(0, len(encoded) - 1)), "length")]
    else:
        for _ in range(data.draw(st.integers(1, 8), "flips")):
            position = data.draw(st.integers(0, len(encoded) - 1), "position")
            encoded[position] ^= data.draw(st.integers(1, 255), "mask")
    result = _read(bytes(encoded))
    assert isinstance(result, BadInputError) or result.mode == "RGB"


@PROPERTY
@given(images())
def test_the_api_reads_an_image_file_as_the_cli_does(drawn):
    """`qmllm check FILE` reads through `open_image_checked`; the API is handed `Image.open(FILE)` and converts
    it with `to_rgb`: the same pixels, alpha composited on white and 16-bit scaled alike."""
    image, fmt = drawn
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"input.{fmt.lower()}"
        path.write_bytes(_encoded(image, fmt))
        cli = open_image_checked(path, LIMIT)
        with Image.open(path) as opened:
            api = to_rgb(opened)
    assert np.array_equal(np.asarray(cli), np.asarray(api))


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=12),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                    max_leaves=12)
TURN = st.fixed_dictionaries({"from": st.sampled_from(["human", "gpt", "system", 3]),
                              "value": st.sampled_from(["<image>\nWhat is it?", "a cat", "", "<image><image>", None])})
RECORD = st.fixed_dictionaries({"id": JSON, "conversations": st.lists(TURN, max_size=5) | JSON},
                               optional={"image": st.sampled_from(["a.png", "../a.png", "/etc/passwd", "missing.png",
                                                                   None, 7])})


@pytest.mark.parametrize("mode", ["error", "skip"])
@PROPERTY
@given(records=st.lists(RECORD | JSON, max_size=6))
def test_any_records_give_a_table_or_a_bad_input_error(mode, records):
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        (folder / "images").mkdir()
        Image.new("RGB", (8, 8), (200, 30, 30)).save(folder / "images" / "a.png")
        path = folder / "records.json"
        path.write_text(json.dumps(records))
        try:
            frame, report = load_llava_json(path, folder / "images", on_bad_input=mode, max_pixels=LIMIT)
        except BadInputError:
            assert mode == "error"
            return
    assert len(frame) + report.as_dict()["skipped_count"] == len(records)
    for turns in frame["conversations"]:
        assert len(turns) % 2 == 0 and [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2)
