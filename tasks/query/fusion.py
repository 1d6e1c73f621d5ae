"""Fusing the rankings of a hybrid query: image vectors, caption vectors, full text.

Each space returns its own ranked candidates (``space``, ``rank``, ``raw`` score: cosine
similarity for the vector spaces, BM25 for full text).  Two ways to fuse them, picked by name:

- ``rrf`` (default): reciprocal rank fusion, score = sum over spaces of 1 / (k + rank).  Needs no
  calibration, which is why it is the default: BM25 and cosine scores are not comparable.
- ``weighted``: each space's scores min-max scaled over its candidates, then a weighted sum
  (weights normalised over the spaces that ran; a candidate absent from a space scores 0
  there): the production design's visual weight alpha = 0.7.

Every fused hit keeps the spaces that found it (``spaces``), so the prompt and the answers can
say where each hit came from.
"""

from __future__ import annotations

from collections.abc import Callable

import polars as pl

SPACES = ("image", "caption", "text")


def parse_spaces(value: str | list | tuple | None) -> tuple[str, ...]:
    """``image+caption+text`` (or ``,``-separated, or a list) → the spaces in canonical order."""
    items = value if isinstance(value, list | tuple) else str(value or "").replace(",", "+") \
        .split("+")
    names = {str(i).strip().lower() for i in items if str(i).strip()}
    unknown = sorted(names - set(SPACES))
    if unknown or not names:
        raise ValueError(f"hybrid spaces {value!r}: give some of {', '.join(SPACES)} joined "
                         "by + (e.g. image+caption+text)")
    return tuple(s for s in SPACES if s in names)


def rrf(legs: pl.DataFrame, opts: dict) -> pl.DataFrame:
    k = int(opts.get("rrf_k") or 60)
    return legs.with_columns(_part=1.0 / (k + pl.col("rank")))


def weighted(legs: pl.DataFrame, opts: dict) -> pl.DataFrame:
    weights = {s: float(opts.get(f"{s}_weight", 1.0) if opts.get(f"{s}_weight") is not None
                        else 1.0) for s in SPACES}
    used = legs["space"].unique().to_list()
    total = sum(weights[s] for s in used) or 1.0
    lo, hi = pl.col("raw").min().over("space"), pl.col("raw").max().over("space")
    scaled = pl.when(hi > lo).then((pl.col("raw") - lo) / (hi - lo)).otherwise(1.0)
    weight = pl.col("space").replace_strict(weights, return_dtype=pl.Float64) / total
    return legs.with_columns(_part=scaled * weight)


FUSIONS: dict[str, Callable[[pl.DataFrame, dict], pl.DataFrame]] = {
    "rrf": rrf, "weighted": weighted}


def fuse(legs: pl.DataFrame, opts: dict) -> pl.DataFrame:
    """One row per image_id: the first leg's columns, ``score`` (fused), ``spaces`` (that found
    it, canonical order), ``caption_similarity`` (from the caption leg, else null)."""
    name = opts.get("fusion") or "rrf"
    if name not in FUSIONS:
        raise ValueError(f"unknown fusion {name!r}; choose one of: {', '.join(FUSIONS)}")
    order = {s: i for i, s in enumerate(SPACES)}
    parts = FUSIONS[name](legs, opts).with_columns(
        _order=pl.col("space").replace_strict(order, return_dtype=pl.Int32))
    caption = pl.col("raw").filter(pl.col("space") == "caption").first()
    data = [c for c in legs.columns if c not in ("space", "rank", "raw", "image_id")]
    return (parts.sort("_order").group_by("image_id", maintain_order=True)
            .agg(*[pl.col(c).first() for c in data],
                 score=pl.col("_part").sum().cast(pl.Float32),
                 spaces=pl.col("space"),
                 caption_similarity=caption.cast(pl.Float32)))
