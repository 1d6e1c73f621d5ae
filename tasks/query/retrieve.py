"""Bulk retrieval at a pinned table version: embed all queries, search many vectors per call.

Text and image queries that share a filter and ``top_k`` go to LanceDB as one matrix search
(results tagged with ``query_index``); hybrid queries (vector + full-text on captions, fused
with reciprocal-rank fusion) go one by one; optionally (``rerank_weight`` > 0) a deeper list of
hybrid candidates (``rerank_depth``) is rescored by CLIP similarity to the query and cut to
``top_k`` (see ``rerank``).  Filters are applied before ranking (prefilter), so
every query gets ``top_k`` hits whenever that many rows match.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import polars as pl

from schemas.tables import SCORE_COLUMNS, table_names, table_suffix
from tasks.io import store
from tasks.io.images import Rejected, decode, read_bytes
from tasks.io.objstore import StorageConfig
from tasks.models.clip import Clip

log = logging.getLogger(__name__)

HIT_COLUMNS = ["image_id", "source_uri", "rel_path", "city", "lat", "lon", "caption",
               *SCORE_COLUMNS]
TEXT_BATCH, IMAGE_BATCH = 256, 32


@dataclass
class Pinned:
    """The ``images`` table checked out at the version this run reads, for reproducibility."""

    table: object
    version: int
    name: str


def pin_images(db_uri: str, dim: int, clip_label: str, version: int | None = None,
               suffix: str | None = None, storage: StorageConfig | None = None) -> Pinned:
    """Open the model's ``images`` table, refuse another model's vectors, check out a version."""
    db = store.connect(db_uri, storage)
    name = table_names(table_suffix(clip_label) if suffix is None else suffix)[0]
    try:
        table = db.open_table(name)
    except ValueError as e:
        raise store.StoreError(f"no '{name}' table in {db_uri} for model {clip_label}: "
                               "run mmrag ingest with this model first") from e
    store.check_model(table, dim, clip_label)
    version = version or table.version
    table.checkout(version)
    return Pinned(table, version, name)


def embed_queries(plan: pl.DataFrame, clip: Clip, max_pixels: int) -> tuple[np.ndarray, dict]:
    """One vector per plan row (NaN where none); image rows use the query image, others text."""
    vectors = np.full((plan.height, clip.dim), np.nan, dtype=np.float32)
    errors: dict[int, str] = {}
    uses_image = plan["image_path"].is_not_null() & plan["mode"].is_in(["image", "hybrid"])
    good = plan["error"].is_null()
    text_idx = np.flatnonzero((good & ~uses_image).to_numpy())
    image_idx = np.flatnonzero((good & uses_image).to_numpy())
    texts = plan["text"].to_list()
    for idx in _batches(text_idx, TEXT_BATCH):
        vectors[idx] = clip.encode_texts([texts[i] for i in idx])
    paths = plan["image_path"].to_list()
    for idx in _batches(image_idx, IMAGE_BATCH):
        ok, pixels = [], []
        for i in idx:
            try:
                pixels.append(decode(read_bytes(paths[i]), clip.input_size, max_pixels)[0])
                ok.append(i)
            except Rejected as r:
                errors[int(i)] = f"query image rejected ({r.stage}): {r.error}"
        if ok:
            vectors[ok] = clip.encode_pixels(np.stack(pixels))
    return vectors, errors


def _batches(idx: np.ndarray, size: int) -> Iterator[np.ndarray]:
    for start in range(0, len(idx), size):
        yield idx[start : start + size]


def search_all(pinned: Pinned, plan: pl.DataFrame, vectors: np.ndarray, errors: dict[int, str],
               search_opts: dict | None = None,
               timings: dict[int, float] | None = None) -> dict[int, list[dict]]:
    """row → ranked hits; failures land in ``errors``, per-query milliseconds in ``timings``."""
    hits: dict[int, list[dict]] = {}
    timings = {} if timings is None else timings
    ready = plan.with_row_index("_i").filter(
        pl.col("error").is_null() & ~pl.col("_i").is_in(list(errors))
    )
    plain = ready.filter(pl.col("mode") != "hybrid")
    for (where, top_k), group in plain.group_by("where", "top_k", maintain_order=True):
        rows, began = group["_i"].to_list(), time.perf_counter()
        try:
            found = _vector_search(pinned.table, vectors[rows], where, top_k, search_opts or {})
            hits.update({rows[q]: found.get(q, []) for q in range(len(rows))})
        except Exception as e:  # noqa: BLE001 - recorded per query, the run goes on
            errors.update(dict.fromkeys(rows, f"search failed: {e}"))
        timings.update(dict.fromkeys(rows, (time.perf_counter() - began) * 1000 / len(rows)))
    for row in ready.filter(pl.col("mode") == "hybrid").iter_rows(named=True):
        began = time.perf_counter()
        try:
            hits[row["_i"]] = _hybrid_search(pinned.table, vectors[row["_i"]], row,
                                             search_opts or {})
        except Exception as e:  # noqa: BLE001
            errors[row["_i"]] = f"hybrid search failed: {e}"
        timings[row["_i"]] = (time.perf_counter() - began) * 1000
    return hits


def _vector_search(table, matrix: np.ndarray, where: str | None, top_k: int,
                   opts: dict) -> dict[int, list[dict]]:
    query = table.search(matrix if len(matrix) > 1 else matrix[0]).distance_type("cosine")
    query = _tune(query, opts)
    if where:
        query = query.where(where, prefilter=True)
    result = pl.from_arrow(query.select([*HIT_COLUMNS, "_distance"]).limit(top_k).to_arrow())
    if "query_index" not in result.columns:
        result = result.with_columns(query_index=pl.lit(0))
    result = result.with_columns(similarity=(1.0 - pl.col("_distance")).cast(pl.Float32))
    return {q: _ranked(g.sort("_distance"), "similarity")
            for (q,), g in result.group_by("query_index")}


def _hybrid_search(table, vector: np.ndarray, row: dict, opts: dict | None = None) -> list[dict]:
    opts = opts or {}
    weight = float(opts.get("rerank_weight") or 0.0)
    depth = max(row["top_k"], int(opts.get("rerank_depth") or 0)) if weight else row["top_k"]
    query = table.search(query_type="hybrid").vector(vector).text(row["text"])
    query = _tune(query.distance_type("cosine"), opts)
    if row["where"]:
        query = query.where(row["where"], prefilter=True)
    # no .select(): LanceDB applies one column list to both legs, and a list that names
    # neither `_distance` nor `_score` is deprecated (a warning per query); the table's
    # columns are few, so the projection happens here instead
    result = pl.from_arrow(query.limit(depth).to_arrow())
    if result.is_empty():
        return []
    result = result.select(*HIT_COLUMNS, "vector", "_relevance_score")
    sims = np.stack(result["vector"].to_numpy()) @ vector
    result = result.with_columns(similarity=pl.Series(sims, dtype=pl.Float32),
                                 score=pl.col("_relevance_score").cast(pl.Float32))
    if weight:
        result = rerank(result, weight)
    return _ranked(result.sort("score", descending=True).head(row["top_k"]), "score")


def rerank(candidates: pl.DataFrame, weight: float) -> pl.DataFrame:
    """Cross-modal rescoring: ``score`` ← weight·sim + (1−weight)·fused-rank score.

    Both are min-max scaled over the candidate list first, because RRF scores (~1/60) and
    cosine similarities live on unrelated scales; a full-text hit whose image does not look
    like the query then sinks, a strong visual match lifted by its caption rises.
    """
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"rerank_weight must be in [0, 1], got {weight}")

    def scaled(col: str) -> pl.Expr:
        lo, hi = pl.col(col).min(), pl.col(col).max()
        return pl.when(hi > lo).then((pl.col(col) - lo) / (hi - lo)).otherwise(1.0)

    fused = weight * scaled("similarity") + (1.0 - weight) * scaled("score")
    return candidates.with_columns(score=fused.cast(pl.Float32))


def _tune(query, opts: dict):
    for name in ("nprobes", "refine_factor"):
        if opts.get(name):
            query = getattr(query, name)(opts[name])
    return query


def _ranked(frame: pl.DataFrame, score_col: str) -> list[dict]:
    frame = frame.with_columns(score=pl.col(score_col).cast(pl.Float32),
                               rank=pl.int_range(1, frame.height + 1, dtype=pl.Int32))
    return frame.select("rank", *HIT_COLUMNS, "similarity", "score").to_dicts()
