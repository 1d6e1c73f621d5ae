"""A dump changed: apply what needs no embedding (moves, deletions, metadata) before the rest.

- **Moves.** A new file whose size equals a vanished file's is hashed here (the only bytes the
  planning step reads); when its bytes are that file's image, it is a move: it gets a ledger row
  at once and is never decoded or embedded.
- **Safety valve.** When more than ``max_delete_fraction`` of the dump's known files vanished
  with their bytes (moved files and copies of a file still there aside) the run refuses before
  writing anything: an unmounted disk or a half-synced bucket looks exactly like that.
- **Deletions** become ledger status ``deleted`` (with run id and time); the images they held
  are reconciled (``tasks.ingest.reconcile``): deleted when no live file holds them.
- **Metadata**: the images of unchanged files whose metadata hash changed are reconciled, which
  rewrites their metadata columns; the new hashes go to the ledger last.

The dump's ``sources`` row is set ``running`` before the first write and ``done`` after the
last one, so a run killed in between makes the next run re-check every image of the dump.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime

import polars as pl
import pyarrow as pa

from schemas.tables import files_schema, sources_schema
from tasks.ingest.plan import Plan, in_dump
from tasks.ingest.reconcile import reconcile
from tasks.io import store

_READ_THREADS = 8


@dataclass(frozen=True)
class ChangeOptions:
    """``max_delete_fraction``: the safety valve; ``allow_deletes``: override it once."""

    max_delete_fraction: float = 0.2
    allow_deletes: bool = False


class DeletionRefused(Exception):
    """Too many of a dump's files vanished at once; one line naming the fraction and the flag."""


@dataclass
class Applied:
    moved: int = 0
    files_deleted: int = 0
    images_deleted: int = 0
    metadata_updated: int = 0


def find_moves(plan: Plan, read: Callable[[str], bytes]) -> pl.DataFrame:
    """The plan's new files holding the bytes of a vanished file (``image_id`` set)."""
    empty = plan.todo.head(0).with_columns(image_id=pl.lit(None, pl.String))
    if plan.vanished is None or not plan.vanished.height:
        return empty
    gone = plan.vanished.filter(pl.col("image_id").is_not_null())
    candidates = plan.todo.filter(pl.col("old_image_id").is_null(), pl.col("escape").is_null(),
                                  pl.col("size").is_in(gone["size"].implode()))
    if not candidates.height:
        return empty
    with ThreadPoolExecutor(_READ_THREADS) as pool:
        digests = list(pool.map(lambda u: _digest(read, u), candidates["source_uri"]))
    found = candidates.with_columns(image_id=pl.Series(digests, dtype=pl.String))
    return found.filter(pl.col("image_id").is_in(gone["image_id"].implode()))


def _digest(read: Callable[[str], bytes], uri: str) -> str | None:
    try:
        return hashlib.sha256(read(uri)).hexdigest()
    except Exception:  # noqa: BLE001 - unreadable now: the pipeline reads it and says why
        return None


def check_deletions(plan: Plan, moved: pl.DataFrame, source: str, opts: ChangeOptions) -> None:
    """Raise ``DeletionRefused`` when too large a share of the dump's known files vanished."""
    if plan.vanished is None or not plan.vanished.height or opts.allow_deletes:
        return
    moved_ids = moved["image_id"].implode()
    gone = plan.vanished.filter(~pl.col("kept"),
                                ~pl.col("image_id").is_in(moved_ids).fill_null(False))
    known = plan.known
    fraction = gone.height / max(known, 1)
    if fraction > opts.max_delete_fraction:
        raise DeletionRefused(
            f"{gone.height} of the {known} files known under {source} are gone "
            f"({fraction:.0%} > MMRAG_MAX_DELETE_FRACTION={opts.max_delete_fraction:g}): "
            "nothing was deleted and no table changed; if they were removed on purpose, "
            "re-run with --allow-deletes (or a larger MMRAG_MAX_DELETE_FRACTION)")


def apply(tables: store.Tables, plan: Plan, moved: pl.DataFrame, run_id: str,
          full: bool, uri_root: str) -> Applied:
    """Write the moves and deletions to the ledger, then reconcile the images they and the
    metadata changes touch (``full``: every image of the dump, after an unfinished run)."""
    now = datetime.now(UTC)
    vanished = plan.vanished if plan.vanished is not None else _no_rows()
    store.upsert_files(tables.files, file_rows(moved.with_columns(status=pl.lit("duplicate")),
                                               run_id))
    store.update_files(tables.files, vanished.select(
        "source_uri", status=pl.lit("deleted"), deleted_run_id=pl.lit(run_id),
        deleted_at=pl.lit(now)).to_arrow())
    changed = plan.meta_changed if plan.meta_changed is not None else _no_rows()
    ids = {*vanished["image_id"].drop_nulls(), *moved["image_id"], *changed["image_id"]}
    if full:
        ids |= dump_image_ids(tables, uri_root)
    result = reconcile(tables, ids, plan.listed, changed.select("source_uri", "meta_hash"))
    return Applied(moved.height, vanished.height, result.images_deleted,
                   result.metadata_updated)


def dump_image_ids(tables: store.Tables, uri_root: str) -> set[str]:
    """Every image a file of the dump holds or held, and every image row pointing into it."""
    ledger = store.ledger_frame(tables.files, ["source_uri", "image_id"]).filter(in_dump(uri_root))
    rows = tables.images.to_polars().select("image_id", "source_uri").filter(in_dump(uri_root))
    return {*ledger["image_id"].drop_nulls(), *rows.collect()["image_id"]}


def file_rows(frame: pl.DataFrame, run_id: str | None) -> pa.Table:
    """Ledger rows from any frame holding the file columns; absent columns are null, and
    ``run_id`` (unless None) stamps the run that records them."""
    schema = files_schema()
    if run_id is not None:
        frame = frame.with_columns(run_id=pl.lit(run_id))
    frame = frame.with_columns(pl.lit(None).alias(f.name) for f in schema
                               if f.name not in frame.columns)
    return frame.select(schema.names).to_arrow().cast(schema)


def _no_rows() -> pl.DataFrame:
    return pl.from_arrow(files_schema().empty_table())


def source_row(uri_root: str, run_id: str, status: str, stat: tuple | None,
               applied: Applied) -> dict:
    """The dump's ``sources`` row: its metadata file as applied, what the run changed."""
    uri, size, mtime = stat or (None, None, None)
    return {"source": uri_root, "status": status, "run_id": run_id, "metadata_uri": uri,
            "metadata_size": size, "metadata_mtime": mtime, "at": datetime.now(UTC),
            "metadata_updated": applied.metadata_updated,
            "files_deleted": applied.files_deleted, "images_deleted": applied.images_deleted,
            "moved": applied.moved}


def finish_source(tables: store.Tables, uri_root: str, run_id: str, images_deleted: int = 0,
                  ) -> None:
    """Mark the dump's run ``done`` (its last write), adding what the end of the run deleted."""
    row = store.source_state(tables.sources, uri_root) or {}
    row = {k: v for k, v in row.items() if k in sources_schema().names}
    stat = (row.get("metadata_uri"), row.get("metadata_size"), row.get("metadata_mtime"))
    applied = Applied(row.get("moved", 0), row.get("files_deleted", 0),
                      row.get("images_deleted", 0) + images_deleted,
                      row.get("metadata_updated", 0))
    store.upsert_source(tables.sources, source_row(uri_root, run_id, "done",
                                                   stat if stat[0] else None, applied))
