"""Backfills: which dumps, in which chunks, and what is already done (the ``backfills`` table).

A backfill runs the ingest core over many dumps in one flow run.  Two records make it
resumable: the per-file ``files`` ledger (a file already there is never read or embedded
again, even inside a dump that was interrupted halfway) and one ``backfills`` row per
(backfill_id, dump), written after each dump, so a re-run skips whole dumps without listing
them.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import time
from datetime import UTC, date, datetime

import polars as pl
import pyarrow as pa
import pyarrow.fs as pafs

from schemas.tables import BACKFILLS_TABLE, FILES_TABLE, backfills_schema
from tasks.ingest.discover import SourceError, open_source
from tasks.io import store
from tasks.io.objstore import StorageConfig

#: a backfill never becomes more than this many Prefect task runs: chunks grow instead
MAX_CHUNKS = 64
_DATE_NAME = re.compile(r"^(\d{4}-\d{2}-\d{2}|\d{8})$")


class BackfillError(Exception):
    """A one-line fatal problem with the request (bad date, no dumps, missing roots)."""


class BackfillIncomplete(Exception):
    """Some dumps failed (recorded as ``failed``; re-running the same backfill retries them).

    Raised after the summary is published so a scheduled run shows up as failed."""

    def __init__(self, summary: dict):
        self.summary = summary
        failed = summary["failed"]
        super().__init__(f"{len(failed)} dump(s) failed: {', '.join(failed[:3])}"
                         f"{' …' if len(failed) > 3 else ''}; re-run the same backfill to retry")


def parse_date(text: str) -> date:
    """``YYYY-MM-DD`` or ``YYYYMMDD``, the two ways dump folders are named."""
    if _DATE_NAME.match(text or ""):
        fmt = "%Y-%m-%d" if "-" in text else "%Y%m%d"
        try:
            return datetime.strptime(text, fmt).date()
        except ValueError:
            pass
    raise BackfillError(f"bad date {text!r}: expected YYYY-MM-DD or YYYYMMDD")


def folder_date(name: str) -> date | None:
    """The date a dump folder is named after, or None (other folders are not dumps)."""
    try:
        return parse_date(name)
    except BackfillError:
        return None


def in_range(names: list[str], start: str | None, end: str | None) -> list[str]:
    """Date-named entries within [start, end] (inclusive, either open), in date order."""
    lo, hi = (parse_date(start) if start else date.min), (parse_date(end) if end else date.max)
    if lo > hi:
        raise BackfillError(f"--start {start} is after --end {end}")
    dated = [(d, n) for n in names if (d := folder_date(n)) is not None and lo <= d <= hi]
    return [n for _, n in sorted(dated)]


def dated_dumps(root: str, start: str | None, end: str | None,
                storage: StorageConfig | None = None) -> list[str]:
    """The sub-folders of ROOT whose names are dates within [start, end], sorted by date."""
    filesystem, path, is_local = _open(root, storage)
    infos = filesystem.get_file_info(pafs.FileSelector(path, recursive=False))
    names = [i.base_name for i in infos if i.type == pafs.FileType.Directory]
    base = path if is_local else normalise(root)
    return [f"{base}/{n}" for n in in_range(names, start, end)]


def normalise(source: str) -> str:
    """One spelling per dump, so the same dumps always give the same backfill id."""
    if "://" not in source or source.startswith("file://"):
        return os.path.realpath(source.removeprefix("file://"))
    return source.rstrip("/")


def resolve_dumps(roots: list[str] | None, root: str | None, start: str | None,
                  end: str | None, storage: StorageConfig | None = None) -> list[str]:
    """Explicit ROOTS (kept in the order given), or ROOT's date folders; all must exist."""
    if roots and root:
        raise BackfillError("give dump folders or --root, not both")
    if (start or end) and not root:
        raise BackfillError("--start/--end select sub-folders of --root: give --root")
    if root:
        dumps = dated_dumps(root, start, end, storage)
        if not dumps:
            raise BackfillError(f"no dump folders named YYYY-MM-DD or YYYYMMDD under {root} "
                                f"within [{start or '…'}, {end or '…'}]")
        return dumps
    if not roots:
        raise BackfillError("no dumps: give dump folders, --root, or --from-ledger")
    missing = [r for r in roots if not _exists(r, storage)]
    if missing:
        raise BackfillError(f"dump folders not found: {', '.join(missing)}")
    return list(dict.fromkeys(normalise(r) for r in roots))


def _open(source: str, storage: StorageConfig | None):
    try:
        return open_source(source, storage)
    except SourceError as e:
        raise BackfillError(f"--root: {e}") from e


def _exists(source: str, storage: StorageConfig | None) -> bool:
    try:
        open_source(source, storage)
    except SourceError:
        return False
    return True


def ledger_roots(db_uri: str, suffix: str = "",
                 storage: StorageConfig | None = None) -> list[str]:
    """Dump roots recorded in a ``files`` ledger: each file's source_uri minus its rel_path.

    The ledger knows every dump ever ingested (by the ingest flow or a backfill), which is
    why re-embedding starts from it rather than from the ``backfills`` table."""
    local = "://" not in db_uri or db_uri.startswith("file://")
    if local and not os.path.isdir(db_uri.removeprefix("file://")):
        raise BackfillError(f"no database at {db_uri}: ingest first")
    try:
        files = store.connect(db_uri, storage).open_table(FILES_TABLE + suffix)
    except ValueError as e:
        raise BackfillError(f"no '{FILES_TABLE + suffix}' ledger in {db_uri}: ingest first") from e
    frame = files.to_polars().select("source_uri", "rel_path").collect()
    tail = pl.lit("/") + pl.col("rel_path")
    roots = (frame.filter(pl.col("source_uri").str.ends_with(tail))
             .select(pl.col("source_uri").str.head(pl.col("source_uri").str.len_chars()
                                                   - tail.str.len_chars()))
             .to_series().unique().sort().to_list())
    if not roots:
        raise BackfillError(f"the '{FILES_TABLE + suffix}' ledger in {db_uri} is empty")
    return roots


def default_backfill_id(dumps: list[str], clip_label: str) -> str:
    """Stable: the same dumps and model give the same id, so re-running a command resumes it."""
    digest = hashlib.sha256(json.dumps([clip_label, dumps]).encode()).hexdigest()
    return f"bf-{digest[:16]}"


def chunked(dumps: list[str], chunk_size: int, max_chunks: int = MAX_CHUNKS) -> list[list[str]]:
    """Consecutive chunks of ``chunk_size`` dumps; larger chunks when there would be too many."""
    if chunk_size < 1:
        raise BackfillError(f"chunk size must be at least 1, not {chunk_size}")
    size = max(chunk_size, math.ceil(len(dumps) / max_chunks))
    return [dumps[i:i + size] for i in range(0, len(dumps), size)]


def progress_rows(db_uri: str, backfill_id: str | None = None,
                  storage: StorageConfig | None = None) -> pl.DataFrame:
    """The ``backfills`` table (one backfill's rows when an id is given); empty if absent."""
    try:
        table = store.connect(db_uri, storage).open_table(BACKFILLS_TABLE)
    except ValueError:
        return pl.from_arrow(backfills_schema().empty_table())
    frame = table.to_polars().collect()
    return frame.filter(pl.col("backfill_id") == backfill_id) if backfill_id else frame


def done_dumps(db_uri: str, backfill_id: str, storage: StorageConfig | None = None) -> set[str]:
    rows = progress_rows(db_uri, backfill_id, storage)
    return set(rows.filter(pl.col("status") == "done")["dump"].to_list())


def record(db_uri: str, row: dict, storage: StorageConfig | None = None) -> None:
    """Upsert one (backfill_id, dump) row under the table's writer lock."""
    row = {"seen": 0, "ingested": 0, "duplicates": 0, "rejected": 0, "seconds": 0.0,
           "error": None} | row | {"finished_at": datetime.now(UTC)}
    table = pa.Table.from_pylist([row], schema=backfills_schema())
    db = store.connect(db_uri, storage)
    with store.writer_lock(db_uri, BACKFILLS_TABLE):
        progress = db.create_table(BACKFILLS_TABLE, schema=backfills_schema(), exist_ok=True)
        (progress.merge_insert(["backfill_id", "dump"]).when_matched_update_all()
         .when_not_matched_insert_all().execute(table))


class Recorder:
    """Writes one backfill's ``backfills`` rows and keeps them for the run's summary."""

    def __init__(self, db_uri: str, backfill_id: str, clip_label: str,
                 storage: StorageConfig | None = None):
        self.db_uri, self.storage = db_uri, storage
        self.base = {"backfill_id": backfill_id, "clip_model": clip_label}
        self.started: dict[str, float] = {}
        self.rows: dict[str, dict] = {}

    def start(self, dump: str) -> None:
        self.started[dump] = time.perf_counter()
        record(self.db_uri, self.base | {"dump": dump, "status": "running"}, self.storage)

    def done(self, dump: str, counts: dict) -> None:
        self._finish(dump, {"status": "done", "seen": counts["seen"],
                            "ingested": counts.get("ingested", 0),
                            "duplicates": counts.get("duplicates", 0),
                            "rejected": sum(counts["rejected"].values())})

    def failed(self, dump: str, error: BaseException) -> None:
        self._finish(dump, {"status": "failed", "error": f"{type(error).__name__}: {error}"[:2000]})

    def _finish(self, dump: str, fields: dict) -> None:
        seconds = round(time.perf_counter() - self.started.get(dump, time.perf_counter()), 3)
        row = self.base | {"dump": dump, "seen": 0, "ingested": 0, "duplicates": 0,
                           "rejected": 0, "error": None} | fields | {"seconds": seconds}
        record(self.db_uri, row, self.storage)
        self.rows[dump] = row
