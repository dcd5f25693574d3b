"""Sample and render emoji scenes: one to three emoji on a coloured background, with a caption.

Every scene has its own generator, seeded by (split seed, scene index), so a scene is reproducible on
its own and two splits with different seeds never share a scene.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from qmllm_pipeline.world.catalogue import NEUTRAL, TOXIC_CATEGORIES
from qmllm_pipeline.world.render import GlyphRenderer, PlacedObject, compose_scene, png_bytes

COUNT_WORDS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five"}
SINGLE, DISTRACTORS, MIXED = "single", "distractors", "mixed"


@dataclass(frozen=True)
class LayoutParams:
    """How objects are placed; sizes are fractions of the image side."""

    image_size: int = 64
    single_size: tuple[float, float] = (0.55, 0.85)
    multi_size: tuple[float, float] = (0.32, 0.5)
    max_angle: float = 20.0
    max_overlap: float = 0.15
    placement_tries: int = 20
    background_jitter: int = 12
    backgrounds: dict[str, tuple[int, int, int]] = field(default_factory=dict)

    @classmethod
    def from_params(cls, params: dict) -> LayoutParams:
        return cls(
            image_size=int(params["image_size"]),
            single_size=tuple(params["single_size"]),
            multi_size=tuple(params["multi_size"]),
            max_angle=float(params["max_angle"]),
            max_overlap=float(params["max_overlap"]),
            placement_tries=int(params["placement_tries"]),
            background_jitter=int(params["background_jitter"]),
            backgrounds={name: tuple(rgb) for name, rgb in params["backgrounds"].items()},
        )


@dataclass(frozen=True)
class SceneRequest:
    """What to draw: `kind` is 'toxic' (with `category` and `difficulty`), 'neutral', 'hard_negative',
    'single' (one given item) or 'mixed' (the pretraining mix: toxic with `toxic_fraction`)."""

    kind: str
    category: str | None = None
    difficulty: str | None = None
    item_id: int | None = None


class SceneSampler:
    def __init__(self, catalogue: pd.DataFrame, layout: LayoutParams, renderer: GlyphRenderer):
        self.catalogue = catalogue.set_index("item_id", drop=False)
        self.layout = layout
        self.renderer = renderer
        self.emojis = dict(zip(catalogue["item_id"], catalogue["emoji"], strict=True))
        self.toxic_by_category = {
            c: catalogue.loc[catalogue["category"] == c, "item_id"].to_numpy() for c in TOXIC_CATEGORIES
        }
        neutral = catalogue["category"] == NEUTRAL
        self.neutral_ids = catalogue.loc[neutral, "item_id"].to_numpy()
        self.plain_neutral_ids = catalogue.loc[neutral & ~catalogue["hard_negative"], "item_id"].to_numpy()
        self.hard_negative_ids = catalogue.loc[catalogue["hard_negative"], "item_id"].to_numpy()

    # -- choosing objects ---------------------------------------------------------------------------
    def _choose_items(
        self, rng: np.random.Generator, request: SceneRequest, mix: dict
    ) -> tuple[list[int], str]:
        kind, difficulty = request.kind, request.difficulty
        if kind == MIXED:
            if rng.random() < mix["toxic_fraction"]:
                kind = "toxic"
                difficulty = SINGLE if rng.random() < mix["toxic_single_fraction"] else DISTRACTORS
            else:
                kind = "neutral"
        if kind == "toxic":
            category = request.category or TOXIC_CATEGORIES[rng.integers(len(TOXIC_CATEGORIES))]
            toxic_item = int(rng.choice(self.toxic_by_category[category]))
            if difficulty == SINGLE:
                return [toxic_item], SINGLE
            n_distractors = int(rng.integers(1, mix["max_objects"]))
            distractors = rng.choice(self.plain_neutral_ids, size=n_distractors, replace=False)
            return [toxic_item, *map(int, distractors)], DISTRACTORS
        if kind == "neutral":
            counts = np.arange(1, len(mix["object_count_weights"]) + 1)
            weights = np.asarray(mix["object_count_weights"], dtype=float)
            n_objects = int(rng.choice(counts, p=weights / weights.sum()))
            pool = self.neutral_ids if mix.get("include_hard_negatives", True) else self.plain_neutral_ids
            return list(map(int, rng.choice(pool, size=n_objects, replace=False))), NEUTRAL
        if kind == "hard_negative":
            item = request.item_id if request.item_id is not None else int(rng.choice(self.hard_negative_ids))
            return [item], "hard_negative"
        if kind == "single":
            return [int(request.item_id)], SINGLE
        raise ValueError(f"unknown scene kind {request.kind!r}")

    # -- placing them -----------------------------------------------------------------------------
    def _place(self, rng: np.random.Generator, item_ids: list[int]) -> list[PlacedObject]:
        layout = self.layout
        side = layout.image_size
        low, high = layout.single_size if len(item_ids) == 1 else layout.multi_size
        placed: list[PlacedObject] = []
        boxes: list[tuple[float, float, float]] = []  # centre x, centre y, half size
        for item_id in item_ids:
            best = None
            for _ in range(layout.placement_tries):
                size = rng.uniform(low, high) * side
                half = size / 2
                x = rng.uniform(half, side - half)
                y = rng.uniform(half, side - half)
                overlap = max((_overlap((x, y, half), box) for box in boxes), default=0.0)
                if best is None or overlap < best[0]:
                    best = (overlap, x, y, size)
                if overlap <= layout.max_overlap:
                    break
            _, x, y, size = best
            angle = float(rng.uniform(-layout.max_angle, layout.max_angle))
            placed.append(PlacedObject(item_id=item_id, x=x, y=y, size=max(4, round(size)), angle=angle))
            boxes.append((x, y, size / 2))
        return placed

    def _background(self, rng: np.random.Generator) -> tuple[str, tuple[int, int, int]]:
        names = sorted(self.layout.backgrounds)
        name = names[rng.integers(len(names))]
        jitter = rng.integers(-self.layout.background_jitter, self.layout.background_jitter + 1, size=3)
        rgb = tuple(int(v) for v in np.clip(np.asarray(self.layout.backgrounds[name]) + jitter, 0, 255))
        return name, rgb

    # -- one scene, many scenes ---------------------------------------------------------------------
    def scene(self, split: str, seed: int, index: int, request: SceneRequest, mix: dict) -> dict:
        rng = np.random.default_rng([seed, index])
        item_ids, difficulty = self._choose_items(rng, request, mix)
        placed = self._place(rng, item_ids)
        background, rgb = self._background(rng)
        image = compose_scene(self.renderer, self.emojis, placed, rgb, self.layout.image_size)
        in_reading_order = sorted(placed, key=lambda obj: obj.x)
        items = self.catalogue.loc[[obj.item_id for obj in in_reading_order]]
        toxic_categories = [c for c in items["category"] if c != NEUTRAL]
        names = list(items["name"])
        return {
            "scene_id": f"{split}-{index:06d}",
            "split": split,
            "seed": seed,
            "index": index,
            "image": png_bytes(image),
            "item_ids": [int(i) for i in items["item_id"]],
            "objects": names,
            "categories": list(items["category"]),
            "toxic": bool(toxic_categories),
            "category": toxic_categories[0] if toxic_categories else NEUTRAL,
            "hard_negative": bool(items["hard_negative"].any()),
            "difficulty": difficulty,
            "n_objects": len(names),
            "background": background,
            "background_rgb": list(rgb),
            "caption": caption(names, background),
        }

    def render_split(self, split: str, seed: int, requests: list[SceneRequest], mix: dict) -> pd.DataFrame:
        rows = [
            self.scene(split, seed, index, request, mix)
            for index, request in enumerate(tqdm(requests, desc=f"render {split}", unit="scene", mininterval=2))
        ]
        return pd.DataFrame(rows)


def _overlap(a: tuple[float, float, float], b: tuple[float, float, float]) -> float:
    """Intersection over the smaller box, for square boxes given as (centre x, centre y, half side)."""
    dx = max(0.0, min(a[0] + a[2], b[0] + b[2]) - max(a[0] - a[2], b[0] - b[2]))
    dy = max(0.0, min(a[1] + a[2], b[1] + b[2]) - max(a[1] - a[2], b[1] - b[2]))
    return dx * dy / (4 * min(a[2], b[2]) ** 2)


def with_article(name: str) -> str:
    vowel_sound = (name[0] in "aeiou" and not name.startswith(("uni", "use", "one"))) or name.startswith("hour")
    return f"{'an' if vowel_sound else 'a'} {name}"


def join_words(words: list[str]) -> str:
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} and {words[-1]}"


def object_phrase(names: list[str]) -> str:
    """'a dog, a cat and a pistol' (objects from left to right)."""
    return join_words([with_article(n) for n in names])


def caption(names: list[str], background: str) -> str:
    """'a dog, a cat and a pistol on a blue background'."""
    return f"{object_phrase(names)} on {with_article(background)} background"


CLIP_TEXT_SIDES = ("objects", "caption")


def clip_text(names: list[str], background: str, text_side: str) -> str:
    """What a text paired with a scene says about it: `objects` ('a dog and a pistol') or the whole
    `caption` (with the background, which lets a CLIP batch be told apart by colour alone)."""
    if text_side not in CLIP_TEXT_SIDES:
        raise ValueError(f"text side must be one of {CLIP_TEXT_SIDES} (foundation.clip.text_side, "
                         f"features.semantic_target_text), not {text_side!r}")
    return object_phrase(names) if text_side == "objects" else caption(names, background)


def scene_texts(scenes, text_side: str) -> list[str]:
    """`clip_text` for every row of a scene table (its `objects` and `background` columns). Real data
    (`ingest`) names no objects: only its captions can be used, and asking for more says so."""
    if text_side == "caption":  # a scene's caption is clip_text(objects, background, "caption")
        return list(scenes["caption"])
    texts = []
    for row, (objects, background) in enumerate(zip(scenes["objects"], scenes["background"], strict=True)):
        if len(objects) == 0:
            raise ValueError(f"scene table row {row} names no objects (real data has none): the '{text_side}' text "
                             "needs them; use 'caption' (features.semantic_target_text, foundation.clip.text_side)")
        texts.append(clip_text(list(objects), background, text_side))
    return texts


def zero_shot_prompts(name: str, backgrounds: list[str], text_side: str) -> list[str]:
    """The prompts whose mean text embedding stands for one item, in the style CLIP was trained on:
    one per background colour for `caption` (prompt ensembling), the object phrase alone for `objects`."""
    return sorted({clip_text([name], background, text_side) for background in backgrounds})


def category_prompts(catalogue: pd.DataFrame, backgrounds: list[str], text_side: str) -> dict[str, list[list[str]]]:
    """Per category, one prompt list (`zero_shot_prompts`) per catalogue item: the text side of a CLIP
    zero-shot filter over the categories (SafeCLIP)."""
    backgrounds = sorted(backgrounds)
    return {category: [zero_shot_prompts(name, backgrounds, text_side)
                       for name in catalogue.loc[catalogue["category"] == category, "name"]]
            for category in (*TOXIC_CATEGORIES, NEUTRAL)}
