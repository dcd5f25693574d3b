"""The curated emoji catalogue: emoji -> name -> category, checked against the font it is drawn with."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

TOXIC_CATEGORIES = ("weapon", "alcohol", "tobacco", "blood", "insulting_gesture", "drugs")
NEUTRAL = "neutral"
CATEGORIES = (*TOXIC_CATEGORIES, NEUTRAL)
REQUIRED_COLUMNS = ("codepoints", "name", "category", "group", "hard_negative")


class CatalogueError(ValueError):
    """The emoji catalogue is malformed; the message names the entry and the problem."""


def emoji_from_codepoints(codepoints: str) -> str:
    """'1F595-1F3FB' -> the emoji string (hex code points joined by '-', OpenMoji's file naming)."""
    return "".join(chr(int(part, 16)) for part in codepoints.split("-"))


def validate_catalogue(raw: pd.DataFrame, font_path: str | Path, source: str = "emoji catalogue") -> pd.DataFrame:
    """Check every entry and return the catalogue with an `emoji` column and a stable `item_id`.

    Raises CatalogueError naming the offending row (1-based, as in the CSV after its header) when a
    column is missing, a code point is malformed, a name, emoji or category is unknown or duplicated,
    or the configured font draws nothing for the glyph.
    """
    from qmllm_pipeline.world.render import GlyphRenderer  # local: Pillow is only needed here

    missing = [c for c in REQUIRED_COLUMNS if c not in raw.columns]
    if missing:
        raise CatalogueError(f"{source}: missing column(s) {missing}; expected {list(REQUIRED_COLUMNS)}")
    catalogue = raw.loc[:, list(REQUIRED_COLUMNS)].copy()
    catalogue["name"] = catalogue["name"].astype(str).str.strip()
    catalogue["hard_negative"] = catalogue["hard_negative"].map(_parse_bool)

    renderer = GlyphRenderer(font_path)
    seen_codepoints: dict[str, int] = {}
    seen_names: dict[str, int] = {}
    emojis = []
    for row_number, row in enumerate(catalogue.itertuples(index=False), start=1):
        where = f"{source}, row {row_number} ({row.codepoints!r}, {row.name!r})"
        try:
            emoji = emoji_from_codepoints(str(row.codepoints))
        except ValueError:
            raise CatalogueError(f"{where}: codepoints must be hex code points joined by '-'") from None
        if row.category not in CATEGORIES:
            raise CatalogueError(f"{where}: unknown category {row.category!r}; known: {list(CATEGORIES)}")
        if row.hard_negative is None:
            raise CatalogueError(f"{where}: hard_negative must be true or false")
        if row.hard_negative and row.category != NEUTRAL:
            raise CatalogueError(f"{where}: only neutral entries can be hard negatives")
        if not row.name:
            raise CatalogueError(f"{where}: empty name")
        if row.codepoints in seen_codepoints:
            raise CatalogueError(f"{where}: duplicate emoji, first listed in row {seen_codepoints[row.codepoints]}")
        if row.name in seen_names:
            raise CatalogueError(f"{where}: duplicate name, first used in row {seen_names[row.name]}")
        if not renderer.draws(emoji):
            raise CatalogueError(f"{where}: the font {Path(font_path).name} draws no colour glyph for it")
        seen_codepoints[row.codepoints] = row_number
        seen_names[row.name] = row_number
        emojis.append(emoji)

    catalogue.insert(0, "item_id", range(len(catalogue)))
    catalogue.insert(2, "emoji", emojis)
    catalogue["toxic"] = catalogue["category"] != NEUTRAL
    present = set(catalogue.loc[catalogue["toxic"], "category"])
    absent = [c for c in TOXIC_CATEGORIES if c not in present]
    if absent:
        raise CatalogueError(f"{source}: no entry for toxic categor{'y' if len(absent) == 1 else 'ies'} {absent}")
    return catalogue


def _parse_bool(value) -> bool | None:
    text = str(value).strip().lower()
    if text in {"true", "1", "yes"}:
        return True
    if text in {"false", "0", "no", ""}:
        return False
    return None
