"""The one schema of the scene tables that `data` (the emoji world) and `ingest` (real data) both write,
and that `features`, `pretrain`, `finetune`, `safety_map` and `evaluate` read. Both writers check their
tables here before anything is saved, so a table a reader cannot use never reaches the catalogue.

Real data has no structured scene: `ingest` writes `objects` empty and `background` "" (readers that
need them say so), and every dialog turn's kind as "conversation".
"""

from __future__ import annotations

import numpy as np
import pandas as pd

_SCENES = {"scene_id": str, "image": bytes, "category": str, "toxic": bool, "difficulty": str}

# table -> column -> the Python type every value must have (list: a list-like of anything)
SCHEMAS: dict[str, dict[str, type]] = {
    "caption_corpus": {"scene_id": str, "image": bytes, "caption": str, "objects": list, "background": str},
    "dialogs": {"id": str, "image": bytes, "conversations": list, "turn_kinds": list},
    "dmap": _SCENES,
    "dmap_validation": _SCENES,
    "eval_toxic": _SCENES,
    "eval_neutral": _SCENES,
    "eval_hard_negative": _SCENES,
    "eval_utility": {"scene_id": str, "image": bytes, "question_type": str, "question": str, "answer": str},
}


# The large tables (stage 1's captions and stage 2's dialogs) may instead be a manifest of image files on disk
# (`ingest.embed_images: false`, the real default): these columns in place of `image`.
MANIFEST: dict[str, type] = {"image_path": str, "image_sha256": str, "image_size": int, "image_bytes": int}
STREAMABLE = ("caption_corpus", "dialogs")


class SchemaError(ValueError):
    """A scene table lacks a column its readers need, or holds a value of the wrong kind."""


def _is(value, kind: type) -> bool:
    if kind is list:
        return isinstance(value, (list, tuple, np.ndarray))
    if kind is bool:
        return isinstance(value, (bool, np.bool_))
    if kind is int:
        return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))
    return isinstance(value, kind)


def check_table(frame: pd.DataFrame, name: str, writer: str = "") -> pd.DataFrame:
    """Return `frame` unchanged if it follows `SCHEMAS[name]`; otherwise raise a SchemaError that names the
    table, the writer and the problem (the first offending row for a wrong value)."""
    schema = SCHEMAS[name]
    if name in STREAMABLE and "image" not in frame.columns and "image_path" in frame.columns:
        schema = {**{k: v for k, v in schema.items() if k != "image"}, **MANIFEST}
    where = f"{name}{f' (written by {writer})' if writer else ''}"
    missing = [column for column in schema if column not in frame.columns]
    if missing:
        raise SchemaError(f"{where}: missing columns {missing}; readers need {list(schema)}")
    for column, kind in schema.items():
        wrong = [i for i, value in enumerate(frame[column]) if not _is(value, kind)]
        if wrong:
            value = frame[column].iloc[wrong[0]]
            raise SchemaError(f"{where}: column '{column}' must hold {kind.__name__} values; row {wrong[0]} has "
                              f"{type(value).__name__} ({len(wrong)} such rows)")
    return frame
