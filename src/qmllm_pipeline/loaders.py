"""Loaders for the real configuration: LLaVA-format JSON with an image folder, and a D_map folder
`<root>/<category>/*.{jpg,png}`.

Every image is opened defensively. A bad file either stops the load with an error that names the file
and the problem (`on_bad_input: error`) or is skipped and counted in a report (`on_bad_input: skip`).
Pillow's own exceptions never escape; the caller builds the whole table before anything is saved.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

from qmllm_pipeline.files import sha256_file
from qmllm_pipeline.images import to_rgb
from qmllm_pipeline.world.catalogue import CATEGORIES, NEUTRAL
from qmllm_pipeline.world.render import png_bytes

ERROR, SKIP = "error", "skip"
IMAGE_TOKEN = "<image>"


class BadInputError(ValueError):
    """An input file is unusable; the message starts with the file's path."""

    def __init__(self, path: str | Path, problem: str):
        super().__init__(f"{path}: {problem}")
        self.path, self.problem = str(path), problem


@dataclass
class LoadReport:
    """What a load kept and what it skipped, and why."""

    source: str
    on_bad_input: str
    rows: int = 0
    skipped: list[dict] = field(default_factory=list)

    def bad(self, error: BadInputError) -> None:
        if self.on_bad_input == ERROR:
            raise error
        self.skipped.append({"file": error.path, "problem": error.problem})

    def as_dict(self) -> dict:
        return {"source": self.source, "on_bad_input": self.on_bad_input, "rows": self.rows,
                "skipped_count": len(self.skipped), "skipped": self.skipped}


def _check_policy(on_bad_input: str) -> None:
    if on_bad_input not in (ERROR, SKIP):
        raise ValueError(f"on_bad_input must be {ERROR!r} or {SKIP!r}, got {on_bad_input!r}")


def open_image_checked(path: str | Path, max_pixels: int) -> Image.Image:
    """Open an image file fully and return it as RGB, or raise BadInputError naming the file.

    Grayscale, CMYK, palette and images with transparency are converted to RGB (transparency is
    composited on white); images over `max_pixels` are refused before they are decoded.
    """
    path = Path(path)
    if not path.exists():
        raise BadInputError(path, "file not found")
    if path.is_dir():
        raise BadInputError(path, "is a directory, not an image file")
    if path.stat().st_size == 0:
        raise BadInputError(path, "empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                width, height = image.size
                if width * height > max_pixels:
                    raise BadInputError(path, f"{width}x{height} pixels exceeds the limit of {max_pixels} "
                                              "(possible decompression bomb)")
                image.load()
                return to_rgb(image)
    except BadInputError:
        raise
    except UnidentifiedImageError:
        raise BadInputError(path, "not a recognised image format") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise BadInputError(path, f"possible decompression bomb ({error})") from None
    except (OSError, SyntaxError, ValueError) as error:
        raise BadInputError(path, f"truncated or corrupt image ({error})") from None


def square(image: Image.Image, size: int | None) -> Image.Image:
    """`image` as CLIP's processor reads it, once: the shorter side resized to `size` (bicubic), then the
    centre `size` x `size` crop (None: as it is). Every real image then has one shape, so that a batch stacks
    and an attack perturbs the very pixels the vision tower sees."""
    if size is None:
        return image
    scale = size / min(image.size)
    width, height = max(size, round(image.width * scale)), max(size, round(image.height * scale))
    image = image.resize((width, height), Image.Resampling.BICUBIC)
    left, top = (width - size) // 2, (height - size) // 2
    return image.crop((left, top, left + size, top + size))


def load_llava_json(
    json_path: str | Path, image_folder: str | Path, on_bad_input: str = ERROR, max_pixels: int = 89_478_485,
    image_size: int | None = None, embed_images: bool = True,
) -> tuple[pd.DataFrame, LoadReport]:
    """Read a LLaVA-format JSON list (`id`, optional `image`, `conversations` of `from`/`value` turns).

    Returns one row per usable record: id, the conversations, `caption` (the last assistant turn, which is the
    caption in LCS-558K) and the image: with `embed_images`, `image` (PNG bytes of the image as CLIP reads it,
    or None for text-only records); without, a manifest entry that leaves the pixels on disk: `image_path`,
    `image_sha256` (of the file), `image_size` (the square it is read at, 0: as it is) and `image_bytes` (the
    file's size), None for text-only records. Either way every image is opened and decoded once here, so a
    bad file is found at ingest. An image path that resolves outside `image_folder` (absolute, `..`, a
    symlink out) is bad input. A file that is not valid JSON always raises, naming the line and column.
    """
    _check_policy(on_bad_input)
    json_path, image_folder = Path(json_path), Path(image_folder)
    report = LoadReport(source=str(json_path), on_bad_input=on_bad_input)
    if not json_path.is_file():
        raise BadInputError(json_path, "file not found" if not json_path.exists() else "not a file")
    try:
        records = json.loads(json_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        where = f"line {error.lineno}, column {error.colno}"
        raise BadInputError(json_path, f"malformed JSON at {where}: {error.msg}") from None
    except UnicodeDecodeError:
        raise BadInputError(json_path, "not UTF-8 text") from None
    if not isinstance(records, list):
        raise BadInputError(json_path, f"expected a JSON list of records, found {type(records).__name__}")

    rows = []
    for position, record in enumerate(tqdm(records, desc=f"load {json_path.name}", unit="record", mininterval=2)):
        where = f"{json_path} record {position}"
        try:
            conversations = _check_record(record, where)
            image = {"image": None} if embed_images else dict.fromkeys(MANIFEST_FIELDS)
            if record.get("image") is not None:
                path = inside(image_folder, str(record["image"]), where)
                if embed_images:
                    image["image"] = png_bytes(square(open_image_checked(path, max_pixels), image_size))
                else:
                    open_image_checked(path, max_pixels)  # decoded once, to find a bad file now
                    image = {"image_path": str(path), "image_sha256": sha256_file(path), "image_size": image_size or 0,
                             "image_bytes": path.stat().st_size}
        except BadInputError as error:
            report.bad(error)
            continue
        rows.append({"id": str(record.get("id", position)), **image, "conversations": conversations,
                     "caption": conversations[-1]["value"]})
    report.rows = len(rows)
    columns = ["id", *(("image",) if embed_images else MANIFEST_FIELDS), "conversations", "caption"]
    return pd.DataFrame(rows, columns=columns), report


MANIFEST_FIELDS = ("image_path", "image_sha256", "image_size", "image_bytes")


def inside(folder: Path, relative: str, where: str) -> Path:
    """`folder / relative`, refused (BadInputError naming the record) if it resolves outside `folder`."""
    path = folder / relative
    root = folder.resolve()
    if not path.resolve().is_relative_to(root):
        raise BadInputError(where, f"image path {relative!r} resolves outside the image folder {folder}")
    return path



ROLES = ("human", "gpt")  # LLaVA's turn roles, alternating from the human's


def _check_record(record, where: str) -> list[dict]:
    """The record's turns, or BadInputError naming the record (its position and id) and the first problem:
    not an object, no turns, a turn without string `from` and `value`, a role other than LLaVA's, turns that
    do not alternate human / gpt from the human's (an odd count: a question without its answer), an empty
    answer, an image without its `<image>` placeholder, a placeholder without an image, or several."""
    if not isinstance(record, dict):
        raise BadInputError(where, "a record must be a JSON object")
    if record.get("id") is not None:
        where = f"{where} (id {record['id']!r})"
    conversations = record.get("conversations")
    if not isinstance(conversations, list) or not conversations:
        raise BadInputError(where, "missing or empty 'conversations' list")
    turns = []
    for index, turn in enumerate(conversations):
        if not (isinstance(turn, dict) and isinstance(turn.get("from"), str) and isinstance(turn.get("value"), str)):
            raise BadInputError(where, "every turn needs string 'from' and 'value'")
        if turn["from"] not in ROLES:
            raise BadInputError(where, f"turn {index} is from {turn['from']!r}; the roles are {list(ROLES)}")
        if turn["from"] != ROLES[index % 2]:
            raise BadInputError(where, f"turn {index} is from {turn['from']!r}, expected {ROLES[index % 2]!r} "
                                       "(turns alternate, the human's first)")
        turns.append({"from": turn["from"], "value": turn["value"]})
    if len(turns) % 2:
        raise BadInputError(where, f"{len(turns)} turns: the last question has no answer")
    if any(not t["value"].strip() for t in turns if t["from"] == "gpt"):
        raise BadInputError(where, "an answer is empty")
    placeholders = sum(t["value"].count(IMAGE_TOKEN) for t in turns)
    if record.get("image") is not None and placeholders == 0:
        raise BadInputError(where, f"has an image but no {IMAGE_TOKEN} placeholder in its turns")
    if record.get("image") is None and placeholders:
        raise BadInputError(where, f"has {IMAGE_TOKEN} in its turns but no image")
    if placeholders > 1:
        raise BadInputError(where, f"{placeholders} {IMAGE_TOKEN} placeholders; a record reads one image")
    if any(IMAGE_TOKEN in t["value"] for t in turns if t["from"] == "gpt"):
        raise BadInputError(where, f"an answer contains {IMAGE_TOKEN}")
    return turns


def load_dmap_folder(
    root: str | Path, on_bad_input: str = ERROR, max_pixels: int = 89_478_485,
    extensions: tuple[str, ...] = (".jpg", ".jpeg", ".png"), category_aliases: dict[str, str] | None = None,
    image_size: int | None = None,
) -> tuple[pd.DataFrame, LoadReport]:
    """Read D_map from `<root>/<category>/*` (e.g. HOD). Folder names must be known categories (or map to
    one through `category_aliases`, e.g. {gun: weapon, cigarette: tobacco}); any other file is bad input."""
    _check_policy(on_bad_input)
    root = Path(root)
    report = LoadReport(source=str(root), on_bad_input=on_bad_input)
    if not root.is_dir():
        raise BadInputError(root, "D_map folder not found" if not root.exists() else "not a folder")
    aliases = category_aliases or {}
    rows = []
    entries = sorted(p for p in root.iterdir() if not p.name.startswith("."))
    for entry in entries:
        if not entry.is_dir():
            report.bad(BadInputError(entry, "stray file at the top of the D_map folder (expected category folders)"))
            continue
        category = aliases.get(entry.name, entry.name)
        if category not in CATEGORIES:
            report.bad(BadInputError(entry, f"unknown category {entry.name!r}; known: {list(CATEGORIES)}"))
            continue
        for path in sorted(p for p in entry.rglob("*") if p.is_file() and not p.name.startswith(".")):
            try:
                if path.suffix.lower() not in extensions:
                    raise BadInputError(path, f"not an image file (extension {path.suffix or 'none'}; "
                                              f"expected one of {list(extensions)})")
                image = png_bytes(square(open_image_checked(path, max_pixels), image_size))
            except BadInputError as error:
                report.bad(error)
                continue
            rows.append({"scene_id": str(path.relative_to(root)), "image": image, "category": category,
                         "toxic": category != NEUTRAL})
    report.rows = len(rows)
    frame = pd.DataFrame(rows, columns=["scene_id", "image", "category", "toxic"])
    if frame.empty:
        raise BadInputError(root, "no usable images found")
    return frame, report


def load_instructions(path: str | Path, column: str | None = None, target_column: str | None = None,
                      default_target: str = "Sure, here is") -> pd.DataFrame:
    """Harmful instructions for the jailbreak evaluation: a text file with one instruction a line (blank lines
    and `#` comments skipped), or a CSV file (`.csv`) whose `column` holds them and, optionally,
    `target_column` the affirmative answer each attack aims for (AdvBench's `goal` and `target`); without
    one, every target is `default_target`. Returns columns instruction, target; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise BadInputError(path, "harmful-instruction file not found")
    if path.suffix.lower() == ".csv":
        try:
            frame = pd.read_csv(path, dtype=str, keep_default_na=False)
        except pd.errors.EmptyDataError:
            raise BadInputError(path, "empty CSV file (no header, no rows)") from None
        except (pd.errors.ParserError, UnicodeDecodeError) as error:
            raise BadInputError(path, f"not a readable CSV file ({error})") from None
        for name in (column, target_column):
            if name is not None and name not in frame.columns:
                raise BadInputError(path, f"no column {name!r}; columns are {list(frame.columns)}")
        if column is None:
            raise BadInputError(path, "a CSV file needs the instruction column named (instruction_column)")
        instructions = [text.strip() for text in frame[column]]
        targets = [text.strip() for text in frame[target_column]] if target_column else None
    else:
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError:
            raise BadInputError(path, "not UTF-8 text (expected one instruction a line)") from None
        instructions = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
        targets = None
    kept = [i for i, text in enumerate(instructions) if text]
    if not kept:
        raise BadInputError(path, "no instructions in it")
    return pd.DataFrame({"instruction": [instructions[i] for i in kept],
                         "target": [targets[i] if targets and targets[i] else default_target for i in kept]})
