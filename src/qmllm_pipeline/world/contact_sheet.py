"""A labelled grid of sample scenes, so a person can look at the world."""

from __future__ import annotations

import pandas as pd
from PIL import Image, ImageDraw, ImageFont

from qmllm_pipeline.world.render import image_from_png


def contact_sheet(groups: dict[str, pd.DataFrame], per_row: int, scale: int = 2) -> Image.Image:
    """One row per group label with up to `per_row` scenes, each drawn `scale` times its size."""
    first = next(iter(groups.values()))
    side = image_from_png(first["image"].iloc[0]).width * scale
    label_width, gap = 150, 4
    font = ImageFont.load_default(size=13)
    sheet = Image.new("RGB", (label_width + per_row * (side + gap), len(groups) * (side + gap) + gap), "white")
    draw = ImageDraw.Draw(sheet)
    for row, (label, scenes) in enumerate(groups.items()):
        top = gap + row * (side + gap)
        draw.text((6, top + side // 2 - 8), label, fill="black", font=font)
        for column, png in enumerate(scenes["image"].iloc[:per_row]):
            tile = image_from_png(png).resize((side, side), Image.Resampling.NEAREST)
            sheet.paste(tile, (label_width + column * (side + gap), top))
    return sheet
