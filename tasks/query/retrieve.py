"""Bulk retrieval at a pinned table version: embed all queries, search many vectors per call.

Text, image and caption queries that share a filter and ``top_k`` go to LanceDB as one matrix
search (results tagged with ``query_index``): text and image queries against the image vectors,
caption queries against the caption vectors.  Hybrid queries go one by one: up to three
rankings (image vectors, caption vectors, full text on captions; ``spaces``) fused by RRF or
weighted scores (``tasks.query.fusion``); optionally (``rerank_weight`` > 0) a deeper list of
hybrid candidates (``rerank_depth``) is rescored by CLIP similarity to the query and cut to
``top_k`` (see ``rerank``).  Filters are applied before ranking (prefilter) in every space, so
every query gets ``top_k`` hits whenever that many rows match.  A table without usable caption
vectors (``Pinned.caption_note``) searches the other spaces and says why.
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
from tasks.query.fusion import fuse, parse_spaces

log = logging.getLogger(__name__)

HIT_COLUMNS = ["image_id", "source_uri", "rel_path", "city", "lat", "lon", "caption",
               *SCORE_COLUMNS]
TEXT_BATCH, IMAGE_BATCH = 256, 32


@dataclass
class Pinned:
    """The ``images`` table checked out at the version this run reads, for reproducibility.

    ``caption_note``: why its caption space cannot serve this run (None: it can)."""

    table: object
    version: int
    name: str
    caption_note: str | None = None


def pin_images(db_uri: str, dim: int, clip_label: str, version: int | None = None,
               suffix: str | None = None, storage: StorageConfig | None = None,
               caption_label: str | None = None) -> Pinned:
    """Open the model's ``images`` table, refuse another model's vectors, check out a version.

    ``caption_label``: the configured caption encoder (None: none), checked against the
    caption vectors of that version."""
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
    return Pinned(table, version, name, caption_note(table, name, caption_label))


def caption_note(table, name: str, label: str | None) -> str | None:
    """Why the caption space is unusable (an old table, no vectors yet, another text model),
    with what to do; None when it is usable."""
    fix = "run `mmrag backfill --captions` to add them"
    if label is None:
        return "no caption encoder is configured (MMRAG_CAPTION_ENCODER=none)"
    if "caption_vector" not in table.schema.names:
        return (f"table '{name}' has no caption vectors (written before images schema version "
                f"2): {fix}")
    found = table.search().where("caption_vector IS NOT NULL").select(["caption_model"]) \
        .limit(1).to_arrow()["caption_model"].to_pylist()
    if not found:
        return f"table '{name}' holds no caption vectors yet: {fix}"
    if found[0] != label:
        return (f"the caption vectors of '{name}' are by {found[0]}, the configured caption "
                f"encoder is {label}: {fix} (re-embeds them)")
    return None


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
               search_opts: dict | None = None, timings: dict[int, float] | None = None,
               caption_vectors: np.ndarray | None = None,
               used: dict[int, list[str]] | None = None) -> dict[int, list[dict]]:
    """row → ranked hits; failures land in ``errors``, per-query milliseconds in ``timings``,
    the spaces each query searched in ``used``.  ``caption_vectors``: the query texts in the
    caption space (NaN rows where none), for ``caption`` and ``hybrid`` rows."""
    hits: dict[int, list[dict]] = {}
    timings = {} if timings is None else timings
    used = {} if used is None else used
    opts = search_opts or {}
    ready = plan.with_row_index("_i").filter(
        pl.col("error").is_null() & ~pl.col("_i").is_in(list(errors))
    )
    for mode, column, matrix in (("image", "vector", vectors), ("text", "vector", vectors),
                                 ("caption", "caption_vector", caption_vectors)):
        rows = ready.filter(pl.col("mode") == mode)
        if rows.height:
            _grouped(pinned, rows, column, matrix, vectors, opts, (hits, errors, timings, used))
    for row in ready.filter(pl.col("mode") == "hybrid").iter_rows(named=True):
        began, i = time.perf_counter(), row["_i"]
        try:
            cvec = caption_vectors[i] if caption_vectors is not None else None
            spaces = usable_spaces(pinned, opts, cvec is not None and np.isfinite(cvec).all())
            hits[i] = fused_search(pinned.table, vectors[i], cvec, row, opts, spaces)
            used[i] = list(spaces)
        except Exception as e:  # noqa: BLE001 - recorded per query, the run goes on
            errors[i] = f"hybrid search failed: {e}"
        timings[i] = (time.perf_counter() - began) * 1000
    return hits


def _grouped(pinned: Pinned, rows: pl.DataFrame, column: str, matrix: np.ndarray | None,
             vectors: np.ndarray, opts: dict, out: tuple) -> None:
    """Matrix searches of one space, one per (filter, top_k) group of rows."""
    hits, errors, timings, used = out
    space = "caption" if column == "caption_vector" else "image"
    for (where, top_k), group in rows.group_by("where", "top_k", maintain_order=True):
        ids, began = group["_i"].to_list(), time.perf_counter()
        try:
            if space == "caption" and (pinned.caption_note or matrix is None):
                raise ValueError(pinned.caption_note or "no caption query vectors")
            found = _vector_search(pinned.table, matrix[ids], where, top_k, opts, column,
                                   vectors[ids])
            hits.update({ids[q]: found.get(q, []) for q in range(len(ids))})
            used.update({i: [space] for i in ids})
        except Exception as e:  # noqa: BLE001 - recorded per query, the run goes on
            errors.update(dict.fromkeys(ids, f"search failed: {e}"))
        timings.update(dict.fromkeys(ids, (time.perf_counter() - began) * 1000 / len(ids)))


def usable_spaces(pinned: Pinned, opts: dict, has_caption_vector: bool = True,
                  ) -> tuple[str, ...]:
    """The hybrid spaces asked for, less the caption space where the table cannot serve it
    or the query has no caption-space vector (no caption encoder was given)."""
    spaces = parse_spaces(opts.get("spaces") or "image+caption+text")
    if "caption" in spaces and (pinned.caption_note or not has_caption_vector):
        spaces = tuple(s for s in spaces if s != "caption")
        if not spaces:
            raise ValueError(pinned.caption_note or "no caption-space query vector")
    return spaces


def _vector_search(table, matrix: np.ndarray, where: str | None, top_k: int, opts: dict,
                   column: str = "vector",
                   image_space: np.ndarray | None = None) -> dict[int, list[dict]]:
    query = table.search(matrix if len(matrix) > 1 else matrix[0], vector_column_name=column)
    query = _tune(query.distance_type("cosine"), opts)
    if where:
        query = query.where(where, prefilter=True)
    extra = ["vector"] if column != "vector" else []
    result = pl.from_arrow(query.select([*HIT_COLUMNS, *extra, "_distance"]).limit(top_k)
                           .to_arrow())
    if "query_index" not in result.columns:
        result = result.with_columns(query_index=pl.lit(0))
    near = (1.0 - pl.col("_distance")).cast(pl.Float32)
    if column == "vector":
        result = result.with_columns(similarity=near, spaces=pl.lit(["image"]),
                                     caption_similarity=pl.lit(None, pl.Float32))
        return {q: _ranked(g.sort("_distance"), "similarity")
                for (q,), g in result.group_by("query_index")}
    out = {}
    for (q,), g in result.group_by("query_index"):
        g = g.sort("_distance").with_columns(caption_similarity=near, spaces=pl.lit(["caption"]))
        out[q] = _ranked(_with_similarity(g, image_space[q]), "caption_similarity")
    return out


def _with_similarity(frame: pl.DataFrame, vector: np.ndarray) -> pl.DataFrame:
    """``similarity``: cosine of the query's image-space vector and each hit's image vector."""
    sims = (np.stack(frame["vector"].to_numpy()) @ vector if frame.height and
            np.isfinite(vector).all() else np.full(frame.height, np.nan))
    return frame.with_columns(similarity=pl.Series(sims, dtype=pl.Float32))


def fused_search(table, vector: np.ndarray, caption_vector: np.ndarray | None, row: dict,
                 opts: dict, spaces: tuple[str, ...]) -> list[dict]:
    """One hybrid query: a ranked list per space, fused (``tasks.query.fusion``), optionally
    reranked by CLIP similarity, cut to ``top_k``."""
    weight = float(opts.get("rerank_weight") or 0.0)
    depth = max(row["top_k"], int(opts.get("rerank_depth") or 0)) if weight else row["top_k"]
    legs = [leg for space in spaces
            if not (leg := _leg(table, space, row, vector, caption_vector, opts, depth))
            .is_empty()]
    if not legs:
        return []
    result = _with_similarity(fuse(pl.concat(legs, how="vertical_relaxed"), opts), vector)
    if weight:
        result = rerank(result, weight)
    return _ranked(result.sort("score", descending=True).head(row["top_k"]), "score")


def _leg(table, space: str, row: dict, vector: np.ndarray, caption_vector: np.ndarray | None,
         opts: dict, depth: int) -> pl.DataFrame:
    """The candidates of one space: hit columns, image vector, rank, raw score."""
    if space == "text":
        query, score = table.search(row["text"], query_type="fts"), pl.col("_score")
    else:
        column, query_vector = (("vector", vector) if space == "image"
                                else ("caption_vector", caption_vector))
        if query_vector is None or not np.isfinite(query_vector).all():
            raise ValueError(f"no query vector for the {space} space")
        query = _tune(table.search(query_vector, vector_column_name=column)
                      .distance_type("cosine"), opts)
        score = 1.0 - pl.col("_distance")
    if row["where"]:
        query = query.where(row["where"], prefilter=True)
    found = pl.from_arrow(query.select([*HIT_COLUMNS, "vector", "_score" if space == "text"
                                        else "_distance"]).limit(depth).to_arrow())
    return found.select(*HIT_COLUMNS, "vector", space=pl.lit(space),
                        rank=pl.int_range(1, found.height + 1, dtype=pl.Int32),
                        raw=score.cast(pl.Float64))


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
    return frame.select("rank", *HIT_COLUMNS, "similarity", "score", "caption_similarity",
                        "spaces").to_dicts()
