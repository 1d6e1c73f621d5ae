"""Grounded answers: boxes in the model's text → per-photo normalised boxes.

The VLM sees one square grid picture (``tasks.query.grid.build_grid``): the query photo and the
best hits, each fitted and centred in its tile.  A box the model writes is in that picture's
coordinates, in the convention its model was trained with (``convention``):

- ``padded``: LLaVA-1.5's native form, ``[x1, y1, x2, y2]`` (single brackets) with fractions
  0..1 of the image after its processor pads it to a square.  The grid is square already, so
  the padded square is the grid itself.
- ``per_mille``: integers 0..1000 of the picture's width and height (Qwen-VL and others).
- ``pixels``: pixels of the ``size``×``size`` prompt picture.

Both ``[a, b, c, d]`` and ``[[a, b, c, d]]`` are read in every convention.  The box is mapped
back: the photo it overlaps most is the one it points at (a box spilling over a tile edge
still lands on its photo, whatever tile its centre is in), the box is clipped to that photo's
fitted rectangle, then expressed as fractions (0..1) of the photo, which is what an analyst
can draw on the original image at any size.  Values a little outside the convention's range
(up to ``SLACK`` of it, e.g. 1.02) are clipped, swapped corners are reordered; a box is dropped
when it is not finite, far out of range, empty, or covers no photo (grey tiles, margins).
Every bracket of four numbers leaves the answer text either way, so it is never read as four
citations.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

_NUM = r"\s*([-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?)\s*"
_FOUR = ",".join([_NUM] * 4)
#: ``[[a,b,c,d]]`` or ``[a,b,c,d]`` (the double form first, so its inner bracket is not split)
BOX = re.compile(r"\[\[" + _FOUR + r"\]\]|\[" + _FOUR + r"\]")
_ANY_BOX = re.compile(r"\[\[[^\[\]]{0,200}\]\]")
SCALES = {"padded": None, "per_mille": 1000.0, "pixels": None}
SLACK = 0.05


@dataclass(frozen=True)
class Tile:
    """One photo of the prompt picture: who it is and its size after thumbnailing."""

    image_id: str | None  # None: the query photo
    rank: int | None  # retrieved rank; None: the query photo
    width: int | None  # None: the photo failed to load (grey tile)
    height: int | None


def tile_rects(tiles: list[Tile], size: int) -> list[tuple[int, int, int]]:
    """(left, top, side) of each tile in the prompt picture, mirroring ``build_grid``."""
    if len(tiles) == 1:
        return [(0, 0, size)]
    side = size // 2
    return [((i % 2) * side, (i // 2) * side, side) for i in range(len(tiles))]


def photo_rect(tile: Tile, left: int, top: int, side: int) -> tuple[float, float, float, float]:
    """Where the fitted photo sits inside its tile (``ImageOps.contain`` + centring)."""
    w, h = tile.width, tile.height
    fw, fh = side, side
    if w > h:
        fh = max(1, round(h / w * side))
    elif w < h:
        fw = max(1, round(w / h * side))
    x0, y0 = left + (side - fw) // 2, top + (side - fh) // 2
    return x0, y0, x0 + fw, y0 + fh


def to_pixels(values: list[float], convention: str, size: int) -> list[float] | None:
    """Four values in ``convention`` → ordered pixel corners of the prompt picture, or None.

    Values up to ``SLACK`` of the range outside it are clipped (a model writing 1.02 means the
    edge); anything further out is not a box of this convention."""
    if convention not in SCALES:
        raise ValueError(f"unknown box convention {convention!r}; choose one of: "
                         + ", ".join(SCALES))
    if not all(math.isfinite(v) for v in values):
        return None
    top = {"padded": 1.0, "per_mille": 1000.0, "pixels": float(size)}[convention]
    if any(v < -SLACK * top or v > (1 + SLACK) * top for v in values):
        return None
    px = [min(max(v, 0.0), top) * size / top for v in values]
    x1, x2 = sorted((px[0], px[2]))
    y1, y2 = sorted((px[1], px[3]))
    return [x1, y1, x2, y2] if x2 > x1 and y2 > y1 else None


def _overlap(box: list[float], rect: tuple[float, float, float, float]) -> float:
    w = min(box[2], rect[2]) - max(box[0], rect[0])
    h = min(box[3], rect[3]) - max(box[1], rect[1])
    return max(w, 0.0) * max(h, 0.0)


def _locate(box: list[float], tiles: list[Tile], size: int) -> dict | None:
    """The box on the photo it overlaps most (first in reading order on a tie), clipped to
    that photo; None when it covers no photo (letterbox margins and grey tiles only)."""
    photos = [photo_rect(t, *r) if t.width else None
              for t, r in zip(tiles, tile_rects(tiles, size), strict=True)]
    areas = [_overlap(box, p) if p else 0.0 for p in photos]
    best = max(range(len(tiles)), key=lambda i: (areas[i], -i))
    if areas[best] <= 0:
        return None
    tile, (x0, y0, x1, y1) = tiles[best], photos[best]
    bx0, by0 = max(box[0], x0), max(box[1], y0)
    bx1, by1 = min(box[2], x1), min(box[3], y1)
    fx, fy = x1 - x0, y1 - y0
    return {"image_id": tile.image_id, "rank": tile.rank,
            "x1": (bx0 - x0) / fx, "y1": (by0 - y0) / fy,
            "x2": (bx1 - x0) / fx, "y2": (by1 - y0) / fy}


def parse_boxes(text: str | None, tiles: list[Tile], size: int,
                convention: str = "padded") -> tuple[str | None, list[dict]]:
    """Answer text without its boxes (every four-number bracket), and the valid boxes mapped
    to their photos."""
    if not text:
        return text, []
    boxes = []
    for match in BOX.finditer(text) if tiles else ():
        values = [float(v) for v in match.groups() if v is not None]
        box = to_pixels(values, convention, size)
        found = _locate(box, tiles, size) if box else None
        if found:
            boxes.append(found)
    cleaned = " ".join(_ANY_BOX.sub(" ", BOX.sub(" ", text)).split())
    cleaned = re.sub(r"\s+([.,;:!?])", r"\1", cleaned)
    return cleaned, boxes
