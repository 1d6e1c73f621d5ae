"""Commit one streamed chunk of embedded files: new ``images`` rows, rejects, ledger rows.

Called under the writer lock, chunk after chunk; each commit re-reads what is stored, so two
writers never add the same image twice, and the ledger rows are written last, so a crash
leaves files the next run simply redoes.
"""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from schemas.tables import SCORE_COLUMNS
from tasks.ingest.changes import file_rows
from tasks.io import store
from tasks.io.captions import caption_columns, fixed_size

#: stages a re-run should retry (the ledger does not record them)
TRANSIENT_STAGES = frozenset({"missing", "read", "embed"})
_STRING_COLUMNS = {"image_id", "stage", "error", "city", "place_id", "caption", "old_image_id",
                   "meta_hash", "caption_model"}
_VECTOR_COLUMNS = ("vector", "caption_vector")


def latest(tables: store.Tables) -> store.Tables:
    """Re-read the newest table versions; call right after taking the writer lock.

    A LanceDB handle keeps reading the version it opened (the connection's default
    ``read_consistency_interval`` is None), so without this a process that waited for the lock
    checks "already stored?" against a stale snapshot and writes duplicates (measured: two
    concurrent ingests of 79 files left 8 duplicate ``images`` rows)."""
    for table in (tables.images, tables.files, tables.rejects, tables.sources):
        if table is not None:
            table.checkout_latest()
    return tables


def commit_chunk(tables: store.Tables, chunk: pa.Table, clip_label: str, run_id: str) -> Counter:
    """Write one streamed chunk: new images, then rejects, then the ledger rows.

    Call it under the writer lock: it reads what is stored, then writes what is missing.
    Caption vectors (``caption_vector``/``caption_model``, from the CLIP actor) are optional:
    without them the rows' caption columns are null, for a caption refresh to fill."""
    latest(tables)
    vectors = _vectors(chunk.column("vector"))
    captions = (_vectors(chunk.column("caption_vector"))
                if "caption_vector" in chunk.column_names else None)
    frame = pl.from_arrow(_typed(chunk.drop_columns(
        [c for c in _VECTOR_COLUMNS if c in chunk.column_names]))).with_row_index("_i")
    frame = frame.with_columns(pl.col(c).cast(pl.Float64).fill_nan(None) for c in
                               (*SCORE_COLUMNS, "lat", "lon"))
    ok = frame.filter(pl.col("stage").is_null()).sort("source_uri")
    bad = frame.filter(pl.col("stage").is_not_null())
    known = store.known_images(tables.images, ok["image_id"].to_list())
    ok = ok.with_columns(_status(known))
    new = ok.filter(pl.col("status") == "ingested", ~pl.col("image_id").is_in(list(known)))
    if new.height:
        width = captions.shape[1] if captions is not None else None
        caption_columns(tables.images, vectors.shape[1], width)
        # a row without a caption has a null caption vector: LanceDB calls that "bad" unless told
        tables.images.add(_image_rows(new, vectors, captions, clip_label, run_id,
                                      tables.images.schema), on_bad_vectors="null")
    store.upsert_rejects(tables.rejects, bad.select(
        "source_uri", "file_name", "stage", "error").to_dicts(), run_id)
    permanent = bad.filter(~pl.col("stage").is_in(list(TRANSIENT_STAGES)))
    store.upsert_files(tables.files, pa.concat_tables([
        file_rows(ok, run_id),
        file_rows(permanent.with_columns(image_id=pl.lit(None, pl.String),
                                         status=pl.lit("rejected")), run_id),
    ]))
    counts = Counter(ok["status"].to_list())
    counts.update(f"rejected:{s}" for s in bad["stage"].to_list())
    return counts


def _typed(chunk: pa.Table) -> pa.Table:
    """Ray turns an all-null object column into floats: restore nulls of the contract's type."""
    for name in _STRING_COLUMNS & set(chunk.column_names):
        col = chunk.column(name)
        if not pa.types.is_string(col.type) and not pa.types.is_large_string(col.type):
            nulls = pa.nulls(len(chunk), pa.string())
            chunk = chunk.set_column(chunk.column_names.index(name), name, nulls)
    for name in ("image_id", "stage", "error", "caption_model"):
        if name not in chunk.column_names:
            continue
        col = pc.if_else(pc.equal(chunk.column(name), ""), None, chunk.column(name))
        chunk = chunk.set_column(chunk.column_names.index(name), name, col)
    return chunk


def _status(known: dict[str, str]) -> pl.Expr:
    """ingested: this file introduced the content; duplicate: another file did (provisional:
    the end of the run reconciles, the smallest live source_uri wins)."""
    introducer = pl.col("image_id").replace_strict(known, default=None, return_dtype=pl.String)
    first_here = pl.col("image_id").is_first_distinct()
    return (
        pl.when(introducer.is_not_null())
        .then(pl.when(introducer == pl.col("source_uri")).then(pl.lit("ingested"))
              .otherwise(pl.lit("duplicate")))
        .when(first_here).then(pl.lit("ingested"))
        .otherwise(pl.lit("duplicate"))
        .alias("status")
    )


def _vectors(column: pa.ChunkedArray) -> np.ndarray:
    arr = column.combine_chunks()
    if hasattr(arr, "to_numpy_ndarray"):
        return np.asarray(arr.to_numpy_ndarray(), dtype=np.float32)
    return np.stack(arr.to_numpy(zero_copy_only=False)).astype(np.float32)


def _image_rows(new: pl.DataFrame, vectors: np.ndarray, captions: np.ndarray | None,
                clip_label: str, run_id: str, stored: pa.Schema) -> pa.Table:
    """The new rows in the stored table's column order (an upgraded old table keeps its own)."""
    rows = new.with_columns(clip_model=pl.lit(clip_label), run_id=pl.lit(run_id),
                            ingested_at=pl.lit(datetime.now(UTC)))
    if captions is None or "caption_model" not in rows.columns:
        rows = rows.with_columns(caption_model=pl.lit(None, pl.String))
    take = new["_i"].to_numpy()
    columns = {"vector": fixed_size(vectors[take]),
               "caption_vector": fixed_size(captions[take] if captions is not None else
                                            np.full((len(take), _width(stored)), np.nan))}
    table = rows.select([n for n in stored.names if n not in columns]).to_arrow()
    for name, array in columns.items():
        table = table.append_column(name, array)
    return table.select(stored.names).cast(stored)


def _width(schema: pa.Schema) -> int:
    return schema.field("caption_vector").type.list_size
