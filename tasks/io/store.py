"""LanceDB access for ingest: open/create the tables, look up, upsert, update, delete.

Writes are ordered so that a crash at any point is repaired by the next run: ``images`` first
(content-addressed, so a re-run cannot duplicate it), then ``rejects``, then ``files`` — the
ledger row is the commit marker that makes a file "done".  The ``sources`` row of a dump says
whether its last run finished (``status``) and which metadata file it applied.

Filters are built only from validated hex ids or from :func:`quote`d literals: a path, a name or
anything else read from a dump never reaches a SQL filter as it is.
"""

from __future__ import annotations

import hashlib
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import lancedb
import polars as pl
import pyarrow as pa
from lancedb.index import FTS, Bitmap, BTree, IvfHnswSq, IvfPq, IvfSq

from schemas.tables import (
    files_schema,
    images_schema,
    rejects_schema,
    sources_schema,
    sources_table,
    table_names,
    table_suffix,
)
from tasks.io.objstore import StorageConfig, storage_options

_HEX = re.compile(r"^[0-9a-f]{64}$")
_RUST_LOCATION = re.compile(r",\s*\S+\.rs:\d+:\d+")  # lance errors end with a source path
_IN_CHUNK = 2000  # ids per ``IN (...)`` filter


class StoreError(Exception):
    """A fatal problem with the database (unreachable, not writable, wrong model)."""


@dataclass
class Tables:
    db: lancedb.DBConnection
    images: lancedb.table.Table
    files: lancedb.table.Table
    rejects: lancedb.table.Table
    sources: lancedb.table.Table | None = None


@contextmanager
def writer_lock(db_uri: str, table: str, timeout: float = 3600) -> Iterator[None]:
    """Serialise writers of one table: concurrent ``merge_insert`` of the same new keys from two
    processes creates duplicates (measured, LanceDB 0.40).  A file lock next to a local database;
    for a remote database the lock is per machine, in the system temp folder (use one writer
    host, or a Prefect concurrency limit, across machines).  Write failures inside become one-line
    ``StoreError``s (``write_errors``)."""
    from filelock import FileLock

    if "://" in db_uri and not db_uri.startswith("file://"):
        digest = hashlib.sha256(db_uri.encode()).hexdigest()[:16]
        path = Path(tempfile.gettempdir()) / "mmrag-locks" / f"{digest}-{table}.lock"
    else:
        path = Path(db_uri.removeprefix("file://") + ".locks") / f"{table}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path), timeout=timeout), write_errors(db_uri):
        yield


@contextmanager
def write_errors(db_uri: str) -> Iterator[None]:
    """A write that fails mid-run (disk full, read-only, network) becomes a one-line
    ``StoreError``.  LanceDB commits are atomic, so the tables stay as the last commit left them."""
    try:
        yield
    except OSError as e:
        raise StoreError(f"cannot write LanceDB at {db_uri}: {e}") from e
    except RuntimeError as e:
        if "LanceError" not in str(e):
            raise
        reason = _RUST_LOCATION.sub("", str(e).strip().splitlines()[0])
        raise StoreError(f"cannot write LanceDB at {db_uri}: {reason}") from e


def connect(uri: str, storage: StorageConfig | None = None) -> lancedb.DBConnection:
    """``storage`` None = the SDK's defaults."""
    try:
        return lancedb.connect(uri, storage_options=storage_options(uri, storage))
    except Exception as e:  # noqa: BLE001 - surfaced as a one-line fatal error
        raise StoreError(f"cannot open LanceDB at {uri}: {e}") from e


def open_tables(uri: str, dim: int, clip_label: str, suffix: str | None = None,
                storage: StorageConfig | None = None) -> Tables:
    """Create missing tables; refuse an ``images`` table made by another CLIP model.

    ``suffix`` None = the model's own table set (``table_suffix``)."""
    db = connect(uri, storage)
    suffix = table_suffix(clip_label) if suffix is None else suffix
    names = table_names(suffix)
    try:
        images = _open_or_create(db, names[0], images_schema(dim))
        files = upgrade(_open_or_create(db, names[1], files_schema()), files_schema())
        rejects = _open_or_create(db, names[2], rejects_schema())
        sources = _open_or_create(db, sources_table(suffix), sources_schema())
    except Exception as e:  # noqa: BLE001 - permission, disk, bad URI: one-line fatal error
        raise StoreError(f"cannot write LanceDB at {uri}: {e}") from e
    check_model(images, dim, clip_label)
    return Tables(db, images, files, rejects, sources)


def _open_or_create(db, name: str, schema: pa.Schema):
    """Open as stored (its schema is checked by the caller), or create from the contract."""
    try:
        return db.open_table(name)
    except ValueError:
        return db.create_table(name, schema=schema, exist_ok=True)


def upgrade(table, schema: pa.Schema):
    """Add the contract's columns an older table lacks, as nulls, in place (one commit; the
    rows and older versions stay as they were).  Another process upgrading at the same moment
    is fine: whatever is still missing after its commit is added."""
    for _ in range(3):
        missing = [f for f in schema if f.name not in table.schema.names]
        if not missing:
            return table
        try:
            table.add_columns(missing)
        except Exception:  # noqa: BLE001 - a concurrent upgrade won: look again
            table.checkout_latest()
    raise StoreError(f"cannot upgrade table '{table.name}' to the current schema")


def quote(value: str) -> str:
    """``value`` as a SQL string literal for a LanceDB filter: single quotes doubled (LanceDB's
    parser takes backslashes literally, so nothing else needs escaping); a NUL is refused."""
    if "\x00" in value:
        raise ValueError("a NUL character cannot be part of a filter")
    return "'" + value.replace("'", "''") + "'"


def _hex_ids(image_ids) -> list[str]:
    return sorted({i for i in image_ids if i and _HEX.match(i)})


def id_filters(image_ids) -> Iterator[tuple[int, str]]:
    """``image_id IN (...)`` filters over validated hex ids, a bounded number per filter."""
    ids = _hex_ids(image_ids)
    for i in range(0, len(ids), _IN_CHUNK):
        part = ids[i:i + _IN_CHUNK]
        yield len(part), "image_id IN (" + ",".join(f"'{x}'" for x in part) + ")"


def check_model(images, dim: int, clip_label: str) -> None:
    width = images.schema.field("vector").type.list_size
    found = images.search().select(["clip_model"]).limit(1).to_arrow()
    other = found["clip_model"][0].as_py() if found.num_rows else None
    if width != dim or (other is not None and other != clip_label):
        raise StoreError(
            f"table '{images.name}' holds vectors of {other or 'another model'} ({width}-d); "
            f"the configured model is {clip_label} ({dim}-d): use another database or table"
        )


def known_images(images, image_ids: list[str]) -> dict[str, str]:
    """image_id → source_uri of the file it comes from, for ids already stored."""
    found = image_rows(images, image_ids, ["source_uri"])
    return dict(zip(found["image_id"].to_list(), found["source_uri"].to_list(), strict=True))


def upsert_rejects(rejects, rows: list[dict], run_id: str) -> int:
    """One row per (source_uri, stage), reasons joined; unchanged reasons are not rewritten."""
    if not rows:
        return 0
    frame = (
        pl.DataFrame(rows, schema={"source_uri": pl.String, "file_name": pl.String,
                                   "stage": pl.String, "error": pl.String})
        .group_by("source_uri", "stage", maintain_order=True)
        .agg(pl.col("file_name").first(), pl.col("error").unique(maintain_order=True)
             .str.join("; "))
    )
    existing = (rejects.to_polars().select("source_uri", "stage", "error")
                .filter(pl.col("source_uri").is_in(frame["source_uri"].unique().implode())))
    fresh = frame.join(existing.collect(), on=["source_uri", "stage", "error"], how="anti")
    if fresh.is_empty():
        return 0
    now = datetime.now(UTC)
    table = fresh.with_columns(run_id=pl.lit(run_id), at=pl.lit(now)).to_arrow()
    table = table.select(rejects_schema().names).cast(rejects_schema())
    (rejects.merge_insert(["source_uri", "stage"]).when_matched_update_all()
     .when_not_matched_insert_all().execute(table))
    return fresh.height


def upsert_files(files, table: pa.Table) -> None:
    if table.num_rows:
        (files.merge_insert("source_uri").when_matched_update_all()
         .when_not_matched_insert_all().execute(table.cast(files_schema())))


def ledger(files) -> pl.LazyFrame | None:
    return files.to_polars() if files.count_rows() else None


def ledger_frame(files, columns: list[str] | None = None) -> pl.DataFrame:
    """The whole ledger (``columns`` of it: a million rows hold ~100 bytes per string column),
    or an empty frame with the contract's columns."""
    if files.count_rows():
        lazy = files.to_polars()
        return (lazy.select(columns) if columns else lazy).collect()
    empty = pl.from_arrow(files_schema().empty_table())
    return empty.select(columns) if columns else empty


def update_files(files, table: pa.Table) -> None:
    """Rewrite some columns of existing ledger rows (``source_uri`` + the columns)."""
    if table.num_rows:
        schema = pa.schema([files_schema().field(c) for c in table.column_names])
        files.merge_insert("source_uri").when_matched_update_all().execute(table.cast(schema))


def image_rows(images, image_ids, columns: list[str]) -> pl.DataFrame:
    """``image_id`` + ``columns`` of the stored rows among ``image_ids`` (never the vectors)."""
    names = ["image_id", *columns]
    parts = [pl.from_arrow(images.search().where(where).select(names).limit(n * 2).to_arrow())
             for n, where in id_filters(image_ids)]
    empty = pl.from_arrow(images.schema.empty_table().select(names))
    return pl.concat([empty, *parts], how="vertical_relaxed")


def delete_images(images, image_ids) -> int:
    """Delete rows by id (older table versions keep them for time travel)."""
    deleted = 0
    for n, where in id_filters(image_ids):
        images.delete(where)
        deleted += n
    return deleted


def update_images(images, rows: pa.Table) -> None:
    """Rewrite some columns of existing rows (``image_id`` + the columns; the vector stays)."""
    if rows.num_rows:
        images.merge_insert("image_id").when_matched_update_all().execute(rows)


def source_state(sources, root: str) -> dict | None:
    """The ``sources`` row of one dump, or None."""
    if sources is None or not sources.count_rows():
        return None
    found = sources.search().where(f"source = {quote(root)}").limit(2).to_list()
    return found[0] if found else None


def upsert_source(sources, row: dict) -> None:
    table = pa.Table.from_pylist([row], schema=sources_schema())
    (sources.merge_insert("source").when_matched_update_all()
     .when_not_matched_insert_all().execute(table))


@dataclass(frozen=True)
class IndexPolicy:
    """When and how to index.  Measured (docs/performance.md, benchmarks/retrieval.py): brute
    force is fine below ~100k rows; IVF_SQ builds several times faster than IVF_PQ and keeps
    recall@10 high without a refine step.  Old versions are kept ``retention_days`` for time
    travel."""

    ann_min_rows: int = 100_000
    ann_index: str = "IVF_SQ"
    retention_days: float = 30.0


_SCALAR = {"images": [("caption", FTS), ("image_id", BTree), ("city", Bitmap)],
           "files": [("source_uri", BTree)]}
_ANN = {"IVF_SQ": IvfSq, "IVF_PQ": IvfPq, "IVF_HNSW_SQ": IvfHnswSq}


def refresh_indexes(tables: Tables, policy: IndexPolicy | None = None) -> list[str]:
    """Create the indexes that are missing; fold new rows into existing ones (``optimize``)."""
    policy, built = policy or IndexPolicy(), []
    for kind, table in (("images", tables.images), ("files", tables.files)):
        rows = table.count_rows()
        if not rows:
            continue
        have = {c for i in table.list_indices() for c in i.columns}
        for column, config in _SCALAR[kind]:
            if column not in have:
                table.create_index(column, config=config(), replace=True)
                built.append(f"{table.name}.{column} ({config.__name__})")
        if kind == "images":
            built += _ann_indexes(table, have, rows, policy)
        if have:
            table.optimize(cleanup_older_than=timedelta(days=policy.retention_days))
            built.append(f"{table.name} optimized")
    return built


def _ann_indexes(table, have: set[str], rows: int, policy: IndexPolicy) -> list[str]:
    """An ANN index per vector column (image and caption spaces) once it holds enough vectors;
    a caption column counts only its non-null rows."""
    built = []
    for column in ("vector", "caption_vector"):
        if column in have or column not in table.schema.names:
            continue
        n = rows if column == "vector" else table.count_rows(f"{column} IS NOT NULL")
        if n < policy.ann_min_rows:
            continue
        parts = max(16, int(n**0.5))
        cfg = _ANN[policy.ann_index](distance_type="cosine", num_partitions=parts)
        table.create_index(column, config=cfg, replace=True)
        built.append(f"{table.name}.{column} ({policy.ann_index}, {parts} partitions)")
    return built
