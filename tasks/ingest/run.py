"""Ingest core: prepare a plan, stream it through Ray, commit each chunk loss-free.

Plain functions over Arrow/Polars; ``flows/ingest.py`` wires them as Prefect tasks.  The
ledger row in ``files`` is written last for every file, so a crash anywhere leaves work that
the next run simply redoes; ``images`` is content-addressed, so redoing cannot duplicate it.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from schemas.tables import SCORE_COLUMNS, files_schema, images_schema
from tasks.ingest.discover import list_dump, open_source
from tasks.ingest.metadata import load_metadata
from tasks.ingest.plan import plan_ingest
from tasks.io import atomic, store
from tasks.io.objstore import StorageConfig
from tasks.models.clip import ClipSpec

log = logging.getLogger(__name__)

#: stages a re-run should retry (the ledger does not record them)
TRANSIENT_STAGES = frozenset({"missing", "read", "embed"})
_STRING_COLUMNS = {"image_id", "stage", "error", "city", "place_id", "caption", "old_image_id"}


@dataclass
class IngestCounts:
    seen: int = 0
    unchanged: int = 0
    todo: int = 0
    ingested: int = 0
    duplicates: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    orphans_removed: int = 0
    seconds: float = 0.0

    @property
    def images_per_s(self) -> float:
        return round(self.todo / self.seconds, 2) if self.seconds else 0.0

    def as_dict(self) -> dict:
        return asdict(self) | {"images_per_s": self.images_per_s}


def prepare(source: str, db_uri: str, spec: ClipSpec, dim: int, run_id: str,
            plan_path: Path, suffix: str | None = None,
            storage: StorageConfig | None = None) -> IngestCounts:
    """List SOURCE, parse metadata, anti-join the ledger; write the plan; record path rejects.

    ``storage`` reaches s3:// dumps and databases (None = the SDK's defaults)."""
    filesystem, root, is_local = open_source(source, storage)
    uri_root = root if is_local else source.split("://", 1)[0] + "://" + root
    listing = list_dump(source, storage)
    tables = store.open_tables(db_uri, dim, spec.label, suffix, storage)
    if not _anything_new(listing, store.ledger(tables.files)):
        return IngestCounts(seen=listing.num_rows, unchanged=listing.num_rows)
    meta = load_metadata(filesystem, root, "" if is_local else source.split("://", 1)[0] + "://")
    with store.writer_lock(db_uri, tables.images.name):
        plan = _plan_and_record(tables, listing, meta, uri_root, run_id)
    todo = plan.todo.filter(pl.col("escape").is_null())
    atomic.write_parquet(todo, plan_path)
    stages = Counter(r["stage"] for r in plan.rejects)
    return IngestCounts(seen=plan.seen, unchanged=plan.unchanged, todo=todo.height,
                        rejected=dict(stages))


def _anything_new(listing: pa.Table, ledger: pl.LazyFrame | None) -> bool:
    """The no-op fast path: an unchanged dump needs no metadata parse and no writes."""
    if ledger is None:
        return listing.num_rows > 0
    keys = ["source_uri", "size", "mtime"]
    known = ledger.select(keys).collect()
    return pl.from_arrow(listing.select(keys)).join(known, on=keys, how="anti").height > 0


def _plan_and_record(tables: store.Tables, listing: pa.Table, meta, uri_root: str,
                     run_id: str):
    """Ledger anti-join, then record what is rejected without reading (path escapes)."""
    latest(tables)
    plan = plan_ingest(listing, meta, store.ledger(tables.files), uri_root)
    escaped = plan.todo.filter(pl.col("escape").is_not_null())
    plan.rejects += [
        {"source_uri": u, "file_name": n, "stage": "path", "error": e}
        for u, n, e in escaped.select("source_uri", "file_name", "escape").iter_rows()
    ]
    store.upsert_rejects(tables.rejects, plan.rejects, run_id)
    store.upsert_files(tables.files, _file_rows(escaped, None, "rejected", run_id))
    return plan


def latest(tables: store.Tables) -> store.Tables:
    """Re-read the newest table versions; call right after taking the writer lock.

    A LanceDB handle keeps reading the version it opened (the connection's default
    ``read_consistency_interval`` is None), so without this a process that waited for the lock
    checks "already stored?" against a stale snapshot and writes duplicates (measured: two
    concurrent ingests of 79 files left 8 duplicate ``images`` rows)."""
    for table in (tables.images, tables.files, tables.rejects):
        table.checkout_latest()
    return tables


def commit_chunk(tables: store.Tables, chunk: pa.Table, clip_label: str, run_id: str) -> Counter:
    """Write one streamed chunk: new images, then rejects, then the ledger rows.

    Call it under the writer lock: it reads what is stored, then writes what is missing."""
    latest(tables)
    vectors = _vectors(chunk.column("vector"))
    frame = pl.from_arrow(_typed(chunk.drop_columns(["vector"]))).with_row_index("_i")
    frame = frame.with_columns(pl.col(c).cast(pl.Float64).fill_nan(None) for c in
                               (*SCORE_COLUMNS, "lat", "lon"))
    ok, bad = frame.filter(pl.col("stage").is_null()), frame.filter(pl.col("stage").is_not_null())
    known = store.known_images(tables.images, ok["image_id"].to_list())
    ok = ok.with_columns(_status(known))
    new = ok.filter(pl.col("status") == "ingested", ~pl.col("image_id").is_in(list(known)))
    if new.height:
        tables.images.add(_image_rows(new, vectors, clip_label, run_id))
    store.upsert_rejects(tables.rejects, bad.select(
        "source_uri", "file_name", "stage", "error").to_dicts(), run_id)
    permanent = bad.filter(~pl.col("stage").is_in(list(TRANSIENT_STAGES)))
    store.upsert_files(tables.files, pa.concat_tables([
        _file_rows(ok, "image_id", None, run_id),
        _file_rows(permanent, None, "rejected", run_id),
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
    for name in ("image_id", "stage", "error"):
        col = pc.if_else(pc.equal(chunk.column(name), ""), None, chunk.column(name))
        chunk = chunk.set_column(chunk.column_names.index(name), name, col)
    return chunk


def _status(known: dict[str, str]) -> pl.Expr:
    """ingested: this file introduced the content; duplicate: another file did."""
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


def _image_rows(new: pl.DataFrame, vectors: np.ndarray, clip_label: str, run_id: str) -> pa.Table:
    schema = images_schema(vectors.shape[1])
    rows = new.with_columns(clip_model=pl.lit(clip_label), run_id=pl.lit(run_id),
                            ingested_at=pl.lit(datetime.now(UTC)))
    table = rows.select([n for n in schema.names if n != "vector"]).to_arrow()
    flat = vectors[new["_i"].to_numpy()].reshape(-1)
    vec = pa.FixedSizeListArray.from_arrays(pa.array(flat, pa.float32()), vectors.shape[1])
    return table.append_column("vector", vec).cast(schema)


def _file_rows(frame: pl.DataFrame, id_col: str | None, status: str | None,
               run_id: str) -> pa.Table:
    rows = frame.with_columns(
        (pl.col(id_col) if id_col else pl.lit(None, pl.String)).alias("image_id"),
        (pl.lit(status) if status else pl.col("status")).alias("status"),
        run_id=pl.lit(run_id),
    )
    return rows.select(files_schema().names).to_arrow().cast(files_schema())


def finish(tables: store.Tables, old_ids: list[str],
           policy: store.IndexPolicy | None = None) -> tuple[int, list[str]]:
    """After all chunks: drop images orphaned by changed files, refresh indexes."""
    removed = store.delete_orphans(latest(tables), old_ids)
    return removed, store.refresh_indexes(tables, policy)


def elapsed(start: float) -> float:
    return round(time.perf_counter() - start, 3)


def process(plan_path: Path, db_uri: str, spec: ClipSpec, run_id: str, opts: dict,
            progress=None, suffix: str | None = None, storage: StorageConfig | None = None,
            policy: store.IndexPolicy | None = None) -> IngestCounts:
    """Stream the plan through Ray; commit chunk by chunk; ``progress(n_done)`` after each."""
    from tasks.ingest.pipeline import embed_files
    from tasks.models.clip import model_shape

    dim, size = model_shape(spec)
    storage = StorageConfig() if storage is None else storage
    tables = store.open_tables(db_uri, dim, spec.label, suffix, storage)
    todo = pl.read_parquet(plan_path)
    start, counts = time.perf_counter(), Counter()
    stream = embed_files(todo.drop("escape").to_arrow(), spec, image_size=size,
                         storage=storage, **opts)
    for chunk in stream:
        with store.writer_lock(db_uri, tables.images.name):
            counts += commit_chunk(tables, chunk, spec.label, run_id)
        if progress:
            progress(chunk.num_rows)
    old = todo["old_image_id"].drop_nulls().to_list()
    with store.writer_lock(db_uri, tables.images.name):
        removed, built = finish(tables, old, policy)
    log.info("indexes refreshed: %s", ", ".join(built) or "none")
    rejected = {k.split(":", 1)[1]: v for k, v in counts.items() if k.startswith("rejected:")}
    return IngestCounts(todo=todo.height, ingested=counts["ingested"],
                        duplicates=counts["duplicate"], rejected=rejected,
                        orphans_removed=removed, seconds=elapsed(start))
