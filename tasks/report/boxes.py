"""Grounded boxes of an answer → CSS overlays on the thumbnails they belong to.

A box (``schemas.answers``' ``boxes`` column, when the file has it) is normalised to its
image: ``x1 y1 x2 y2`` in 0..1 of the width/height.  ``rank`` names the retrieved hit (its
``image_id`` must agree when given); ``rank`` and ``image_id`` both null mean the query image.
Percent offsets inside a wrapper exactly the size of the ``<img>`` then place it over any
rendering of the image, whatever its displayed size, since the thumbnail keeps the aspect.
"""

from __future__ import annotations

import math

_COORDS = ("x1", "y1", "x2", "y2")


def _clamp(v: float) -> float:
    return min(1.0, max(0.0, v))


def css_box(box: dict, key: str) -> dict | None:
    """Percent ``left/top/width/height`` of a valid box (clamped to the image), else None."""
    try:
        x1, y1, x2, y2 = (float(box[c]) for c in _COORDS)
    except (KeyError, TypeError, ValueError):
        return None
    if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
        return None
    x1, y1, x2, y2 = _clamp(x1), _clamp(y1), _clamp(x2), _clamp(y2)
    if x2 <= x1 or y2 <= y1:
        return None
    return {"key": key, "left": round(x1 * 100, 4), "top": round(y1 * 100, 4),
            "width": round((x2 - x1) * 100, 4), "height": round((y2 - y1) * 100, 4)}


def _target(box: dict, by_rank: dict[int, dict]) -> tuple[bool, int | None]:
    """(matched, rank or None for the query image)."""
    rank, image_id = box.get("rank"), box.get("image_id")
    if rank is None:
        return image_id is None, None
    hit = by_rank.get(rank)
    if hit is None or (image_id is not None and image_id != hit.get("image_id")):
        return False, None
    return True, rank


def boxes_by_target(boxes: list[dict] | None,
                    hits: list[dict]) -> tuple[dict[int | None, list[dict]], int]:
    """({hit rank, or None for the query image: [css box]}, boxes that matched nothing)."""
    by_rank = {h.get("rank"): h for h in hits if h.get("rank") is not None}
    out: dict[int | None, list[dict]] = {}
    unmatched = 0
    for box in boxes or []:
        if not isinstance(box, dict):
            unmatched += 1
            continue
        ok, rank = _target(box, by_rank)
        css = css_box(box, str(len(out.get(rank, [])))) if ok else None
        if css is None:
            unmatched += 1
            continue
        out.setdefault(rank, []).append(css)
    return out, unmatched
