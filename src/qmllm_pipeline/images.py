"""How every reader turns an image file into RGB pixels: the loaders, `qmllm check` / `chat`, and the Python
API (`GuardedMLLM.check` / `answer` on Pillow images). Pillow and NumPy only, so that reading an image never
imports the models."""

from __future__ import annotations

import numpy as np
from PIL import Image


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow image as RGB, one way for every reader (the loaders, `qmllm check`, the Python API):
    transparency composited on white, 16-bit, 32-bit and float grayscale scaled to 8 bits by the image's
    brightest pixel (Pillow's own conversion would clip them; NaN and negative values read as black),
    palette, CMYK and grayscale converted."""
    if image.mode == "RGB":
        return image.copy()
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode.startswith("I;16") or image.mode in ("I", "F"):
        values = np.clip(np.nan_to_num(np.asarray(image, dtype=np.float64), posinf=0.0, neginf=0.0), 0.0, None)
        top = values.max() or 1.0  # the image's own range: its brightest pixel becomes white
        image = Image.fromarray(np.round(values * (255.0 / top)).astype("uint8"), mode="L")
    return image.convert("RGB")
