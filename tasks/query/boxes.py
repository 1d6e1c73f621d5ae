"""Grounded answers: ``[[x1,y1,x2,y2]]`` boxes in the model's text → per-photo normalised boxes.

The VLM sees one grid picture (``tasks.query.prompts.build_grid``): the query photo and the best
hits,
each fitted and centred in its tile.  A box the model writes is in that picture's coordinates,
so it is mapped back: the tile holding the box centre says which photo it points at, the box is
clipped to that photo's fitted rectangle, then expressed as fractions (0..1) of the photo, which
is what an analyst can draw on the original image at any size.

Coordinates: all four values ≤ 1 are fractions of the prompt picture (LLaVA-1.5 / Shikra
style); otherwise they are pixels of the ``size``×``size`` prompt picture.  A box is dropped when
it is malformed, not finite, empty after clipping, or lands on a missing (grey) tile; the answer
text loses every ``[[…]]`` group either way, so citations and readers see clean prose.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

_NUM = r"\s*([-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?)\s*"
BOX = re.compile(r"\[\[" + ",".join([_NUM] * 4) + r"\]\]")
_ANY_BOX = re.compile(r"\[\[[^\[\]]{0,200}\]\]")


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


def _to_pixels(values: list[float], size: int) -> list[float]:
    return [v * size for v in values] if all(v <= 1.0 for v in values) else values


def _locate(box: list[float], tiles: list[Tile], size: int) -> dict | None:
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    for tile, (left, top, side) in zip(tiles, tile_rects(tiles, size), strict=True):
        if not (left <= cx < left + side and top <= cy < top + side) or tile.width is None:
            continue
        x0, y0, x1, y1 = photo_rect(tile, left, top, side)
        bx0, by0 = max(box[0], x0), max(box[1], y0)
        bx1, by1 = min(box[2], x1), min(box[3], y1)
        if bx1 <= bx0 or by1 <= by0:
            return None
        fx, fy = x1 - x0, y1 - y0
        return {"image_id": tile.image_id, "rank": tile.rank,
                "x1": (bx0 - x0) / fx, "y1": (by0 - y0) / fy,
                "x2": (bx1 - x0) / fx, "y2": (by1 - y0) / fy}
    return None


def parse_boxes(text: str | None, tiles: list[Tile], size: int) -> tuple[str | None, list[dict]]:
    """Answer text without its ``[[…]]`` groups, and the valid boxes mapped to their photos."""
    if not text or not tiles:
        return text, []
    boxes = []
    for match in BOX.finditer(text):
        values = [float(v) for v in match.groups()]
        if not all(math.isfinite(v) for v in values):
            continue
        box = _to_pixels(values, size)
        box = [min(max(v, 0.0), float(size)) for v in box]
        if box[2] <= box[0] or box[3] <= box[1]:
            continue
        found = _locate(box, tiles, size)
        if found:
            boxes.append(found)
    cleaned = " ".join(_ANY_BOX.sub(" ", text).split())
    cleaned = re.sub(r"\s+([.,;:!?])", r"\1", cleaned)
    return cleaned, boxes
