"""Contact sheets: one PNG per cluster, strips of thumbnails with a caption under each.

A sheet is a column of :class:`Strip` s: a title line, then ``rows`` rows of
:data:`COLUMNS` tiles. A :class:`Tile` is a thumbnail centred on a light grey square
(a grey "unreadable" square when its source could not be read), a coloured bar under
it when labels tell whether the prediction is right (green) or wrong (red), and a
caption (the confidence).

Every size is a constant below, so a sheet's pixel size depends only on how many rows
its strips have (:func:`sheet_size`), never on the images: every cluster's sheet lines
up on the page, and a test can tell what to expect.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

__all__ = ["COLUMNS", "TILE", "Strip", "Tile", "draw_sheet", "sheet_size"]

COLUMNS = 8  # tiles per row
TILE = 64  # a thumbnail fits in TILE x TILE pixels
BAR = 4  # the right/wrong bar under a thumbnail
CAPTION = 15  # the caption line under the bar
GAP = 6  # between tiles, across and down
MARGIN = 12  # around the sheet
TITLE = 22  # a strip's title line
STRIP_GAP = 10  # between strips

_BACKGROUND = (255, 255, 255)
_TILE_BACKGROUND = (232, 235, 240)
_UNREADABLE = (205, 205, 205)
_TEXT = (34, 34, 34)
_MUTED = (110, 110, 110)
_CORRECT = (42, 157, 75)
_WRONG = (209, 73, 91)


@dataclass
class Tile:
    """One thumbnail (None when unreadable), its caption and, with labels, right or wrong."""

    image: Image.Image | None
    caption: str
    correct: bool | None = None


@dataclass
class Strip:
    """A titled band of ``rows`` x :data:`COLUMNS` tiles (extra tiles are not drawn)."""

    title: str
    rows: int
    tiles: list[Tile] = field(default_factory=list)
    empty_text: str = "none"


def _cell_height() -> int:
    return TILE + BAR + CAPTION


def _strip_height(rows: int) -> int:
    return TITLE + rows * _cell_height() + (rows - 1) * GAP


def sheet_size(strip_rows: Sequence[int]) -> tuple[int, int]:
    """``(width, height)`` in pixels of a sheet whose strips have these numbers of rows."""
    width = 2 * MARGIN + COLUMNS * TILE + (COLUMNS - 1) * GAP
    height = 2 * MARGIN + sum(_strip_height(r) for r in strip_rows)
    return width, height + STRIP_GAP * max(0, len(strip_rows) - 1)


@lru_cache(maxsize=4)
def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):  # Pillow < 10.1 or no FreeType
        return ImageFont.load_default()


def _draw_tile(sheet: Image.Image, draw: ImageDraw.ImageDraw, x: int, y: int, tile: Tile) -> None:
    """One tile with its top-left corner at ``(x, y)``."""
    if tile.image is None:
        draw.rectangle([x, y, x + TILE - 1, y + TILE - 1], fill=_UNREADABLE)
        draw.text((x + TILE // 2, y + TILE // 2), "unreadable", fill=_MUTED,
                  font=_font(10), anchor="mm")  # fmt: skip
    else:
        draw.rectangle([x, y, x + TILE - 1, y + TILE - 1], fill=_TILE_BACKGROUND)
        image = tile.image
        sheet.paste(image, (x + (TILE - image.width) // 2, y + (TILE - image.height) // 2))
    if tile.correct is not None:
        draw.rectangle([x, y + TILE, x + TILE - 1, y + TILE + BAR - 2],
                       fill=_CORRECT if tile.correct else _WRONG)  # fmt: skip
    draw.text((x + TILE // 2, y + TILE + BAR + CAPTION // 2), tile.caption, fill=_TEXT,
              font=_font(11), anchor="mm")  # fmt: skip


def _draw_strip(sheet: Image.Image, draw: ImageDraw.ImageDraw, y: int, strip: Strip) -> None:
    """One strip with its title line at height ``y``."""
    draw.text((MARGIN, y + TITLE // 2), strip.title, fill=_TEXT, font=_font(13), anchor="lm")
    top = y + TITLE
    if not strip.tiles:
        draw.text((MARGIN, top + _cell_height() // 2), strip.empty_text, fill=_MUTED,
                  font=_font(12), anchor="lm")  # fmt: skip
    for i, tile in enumerate(strip.tiles[: strip.rows * COLUMNS]):
        row, column = divmod(i, COLUMNS)
        _draw_tile(sheet, draw, MARGIN + column * (TILE + GAP),
                   top + row * (_cell_height() + GAP), tile)  # fmt: skip


def draw_sheet(strips: Sequence[Strip], path: str | Path) -> Path:
    """Draw the strips one under the other into a PNG at ``path``; returns the path."""
    sheet = Image.new("RGB", sheet_size([s.rows for s in strips]), _BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    y = MARGIN
    for strip in strips:
        _draw_strip(sheet, draw, y, strip)
        y += _strip_height(strip.rows) + STRIP_GAP
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out, format="PNG", optimize=True)
    return out
