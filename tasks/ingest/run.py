"""Ingest core: prepare a plan, stream it through Ray, commit each chunk loss-free.

Plain functions over Arrow/Polars; ``flows/ingest.py`` wires them as Prefect tasks.  The
ledger row in ``files`` is written last for every file, so a crash anywhere leaves work that
the next run simply redoes; ``images`` is content-addressed, so redoing cannot duplicate it.
What needs no embedding (moves, deletions, metadata changes) is applied while preparing
(``tasks.ingest.changes``); the end of the run reconciles the images its files touched and marks
the dump's ``sources`` row done, so a run killed before that is re-checked by the next one.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import polars as pl
import pyarrow as pa

from tasks.ingest import prestart
from tasks.ingest.changes import (
    Applied,
    ChangeOptions,
    apply,
    check_deletions,
    file_rows,
    find_moves,
    finish_source,
    source_row,
)
from tasks.ingest.commit import TRANSIENT_STAGES, commit_chunk, latest  # noqa: F401 - the API
from tasks.ingest.discover import list_dump, open_source
from tasks.ingest.metadata import load_metadata, metadata_stat
from tasks.ingest.plan import (
    KEYS,
    LEDGER_COLUMNS,
    META_VALUES,
    Plan,
    in_dump,
    live_rows,
    plan_ingest,
)
from tasks.ingest.reconcile import reconcile
from tasks.io import atomic, store
from tasks.io.images import read_bytes
from tasks.io.objstore import StorageConfig
from tasks.models.clip import ClipSpec

log = logging.getLogger(__name__)


@dataclass
class IngestCounts:
    seen: int = 0
    unchanged: int = 0
    todo: int = 0
    ingested: int = 0
    duplicates: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    orphans_removed: int = 0
    metadata_updated: int = 0
    deleted: int = 0
    images_deleted: int = 0
    moved: int = 0
    seconds: float = 0.0

    @property
    def images_per_s(self) -> float:
        return round(self.todo / self.seconds, 2) if self.seconds else 0.0

    def as_dict(self) -> dict:
        return asdict(self) | {"images_per_s": self.images_per_s}


def prepare(source: str, db_uri: str, spec: ClipSpec, dim: int, run_id: str,
            plan_path: Path, suffix: str | None = None,
            storage: StorageConfig | None = None, changes: ChangeOptions | None = None,
            policy: store.IndexPolicy | None = None) -> IngestCounts:
    """List SOURCE, parse metadata, compare with the ledger; apply moves, deletions and
    metadata changes; write the plan of files to embed; record path rejects.

    ``storage`` reaches s3:// dumps and databases (None = the SDK's defaults).  Raises
    ``DeletionRefused`` before any write when too many known files vanished."""
    filesystem, root, is_local = open_source(source, storage)
    scheme = "" if is_local else source.split("://", 1)[0] + "://"
    uri_root = scheme + root
    listing = list_dump(source, storage)
    tables = store.open_tables(db_uri, dim, spec.label, suffix, storage)
    stat = metadata_stat(filesystem, root, scheme)
    if _unchanged(listing, tables, uri_root, stat):
        return IngestCounts(seen=listing.num_rows, unchanged=listing.num_rows)
    meta = load_metadata(filesystem, root, scheme)
    with store.writer_lock(db_uri, tables.images.name):
        plan, applied = _plan_and_apply(tables, listing, meta, uri_root, run_id, stat,
                                        changes or ChangeOptions(), storage)
        todo = plan.todo.filter(pl.col("escape").is_null())
        if not todo.height:
            if applied != Applied():
                store.refresh_indexes(latest(tables), policy)
            finish_source(tables, uri_root, run_id)
    atomic.write_parquet(todo, plan_path)
    atomic.write_parquet(plan.listed.select("source_uri", *META_VALUES), meta_path(plan_path))
    stages = Counter(r["stage"] for r in plan.rejects)
    return IngestCounts(seen=plan.seen, unchanged=plan.unchanged, todo=todo.height,
                        rejected=dict(stages), metadata_updated=applied.metadata_updated,
                        deleted=applied.files_deleted, images_deleted=applied.images_deleted,
                        moved=applied.moved)


def meta_path(plan_path: Path) -> Path:
    """The dump's metadata values, next to its plan (the end of the run reconciles with them)."""
    return plan_path.with_name(plan_path.stem + ".meta.parquet")


def new_file_count(source: str, db_uri: str, spec: ClipSpec, dim: int,
                   suffix: str | None = None, storage: StorageConfig | None = None) -> int:
    """Files in SOURCE the ledger does not know as they are (new, or their bytes changed): the
    cheap question a command asks before starting workers it may not need, and an upper bound
    of what the plan will embed.  Moved files count here (only planning tells them apart);
    nothing is written."""
    listing = list_dump(source, storage)
    lazy = store.ledger(store.open_tables(db_uri, dim, spec.label, suffix, storage).files)
    return _new_listed(listing, _known(lazy)) if lazy is not None else listing.num_rows


def pipeline_args(spec: ClipSpec, opts: dict, storage: StorageConfig | None) -> dict:
    """What ``embed_files`` takes besides the rows: the pipeline settings, the model's input
    size, the storage the decode tasks read through."""
    from tasks.models.clip import model_shape

    return dict(opts, image_size=model_shape(spec)[1],
                storage=StorageConfig() if storage is None else storage)


def prestart_key(db_uri: str, spec: ClipSpec, args: dict) -> tuple:
    """Which runs may use a pipeline started ahead of the plan: same database, model, settings."""
    return db_uri, spec, repr(sorted(args.items()))


def prestart_embedding(expected: int, db_uri: str, spec: ClipSpec, work_dir: str, opts: dict,
                       storage: StorageConfig | None = None) -> None:
    """Start the embedding pipeline now (Ray is up), for a plan ``process`` will hand it."""
    args = pipeline_args(spec, opts, storage)
    prestart.start(prestart_key(db_uri, spec, args), work_dir, expected, spec, args)


def _known(lazy: pl.LazyFrame) -> pl.DataFrame:
    return live_rows(lazy.select(*KEYS, "status")).collect()


def _new_listed(listing: pa.Table, known: pl.DataFrame) -> int:
    """Listed files with no live ledger row of the same (uri, size, mtime)."""
    return pl.from_arrow(listing.select(KEYS)).join(known, on=KEYS, how="anti").height


def _unchanged(listing: pa.Table, tables: store.Tables, uri_root: str,
               stat: tuple | None) -> bool:
    """The no-op fast path: no new, changed or vanished file, the metadata file as last applied
    and the last run finished: no metadata parse and no writes."""
    lazy = store.ledger(tables.files)
    if lazy is None:
        return listing.num_rows == 0
    known = _known(lazy)
    if _new_listed(listing, known):
        return False
    mine = known.filter(in_dump(uri_root))
    if mine.join(pl.from_arrow(listing.select(["source_uri"])), on="source_uri",
                 how="anti").height:
        return False
    state = store.source_state(tables.sources, uri_root)
    if state is None:
        return mine.height == 0
    applied = (state["metadata_uri"], state["metadata_size"], state["metadata_mtime"])
    return state["status"] == "done" and applied == (stat or (None, None, None))


def _plan_and_apply(tables: store.Tables, listing: pa.Table, meta, uri_root: str, run_id: str,
                    stat: tuple | None, opts: ChangeOptions,
                    storage: StorageConfig | None) -> tuple[Plan, Applied]:
    """Under the writer lock: plan against the newest ledger, refuse mass deletions before any
    write, then mark the dump running, record rejects and apply what needs no embedding."""
    latest(tables)
    files = store.ledger_frame(tables.files, LEDGER_COLUMNS)
    plan = plan_ingest(listing, meta, files if files.height else None, uri_root)
    moved = find_moves(plan, lambda uri: read_bytes(uri, storage))
    check_deletions(plan, moved, uri_root, opts)
    state = store.source_state(tables.sources, uri_root)
    full = plan.known > 0 if state is None else state["status"] != "done"
    store.upsert_source(tables.sources, source_row(uri_root, run_id, "running", stat, Applied()))
    escaped = plan.todo.filter(pl.col("escape").is_not_null())
    plan.rejects += [
        {"source_uri": u, "file_name": n, "stage": "path", "error": e}
        for u, n, e in escaped.select("source_uri", "file_name", "escape").iter_rows()
    ]
    store.upsert_rejects(tables.rejects, plan.rejects, run_id)
    store.upsert_files(tables.files, file_rows(escaped.with_columns(
        image_id=pl.lit(None, pl.String), status=pl.lit("rejected")), run_id))
    applied = apply(tables, plan, moved, run_id, full, uri_root)
    store.upsert_source(tables.sources, source_row(uri_root, run_id, "running", stat, applied))
    plan.todo = plan.todo.join(moved.select("source_uri"), on="source_uri", how="anti")
    return plan, applied


def finish(tables: store.Tables, todo: pl.DataFrame, meta: pl.DataFrame | None, run_id: str,
           policy: store.IndexPolicy | None = None) -> tuple[int, list[str]]:
    """After all chunks: close the dump, refresh indexes."""
    removed = close_dump(tables, todo, meta, run_id)
    return removed, store.refresh_indexes(tables, policy)


def close_dump(tables: store.Tables, todo: pl.DataFrame, meta: pl.DataFrame | None,
               run_id: str) -> int:
    """Reconcile the images the plan's files hold or held (those no file holds any more are
    dropped), then mark the dump's run done.  Under the writer lock; returns images dropped."""
    latest(tables)
    uris = todo["source_uri"].implode()
    held = store.ledger_frame(tables.files, ["source_uri", "image_id"]).filter(
        pl.col("source_uri").is_in(uris))
    ids = {*held["image_id"].drop_nulls(), *todo["old_image_id"].drop_nulls()}
    removed = reconcile(tables, ids, meta).images_deleted
    finish_source(tables, dump_root(todo), run_id, removed)
    return removed


def dump_root(todo: pl.DataFrame) -> str:
    """The dump a plan came from: any file's source_uri minus its rel_path."""
    uri, rel = todo.row(0, named=True)["source_uri"], todo.row(0, named=True)["rel_path"]
    return uri[: len(uri) - len(rel) - 1]


def _stream(plan_path: Path, todo: pl.DataFrame, db_uri: str, spec: ClipSpec, args: dict):
    """The pipeline started ahead of this plan, fed with it, if the command started one for
    the same database, model and settings; else a new one over the plan's rows."""
    from tasks.ingest.pipeline import embed_files

    pending = prestart.take(prestart_key(db_uri, spec, args))
    if pending is None:
        yield from embed_files(todo.drop("escape").to_arrow(), spec, **args)
        return
    pending.feed(plan_path)
    try:
        yield from pending.stream()
    finally:
        pending.close()


def read_meta(plan_path: Path) -> pl.DataFrame | None:
    path = meta_path(plan_path)
    return pl.read_parquet(path) if path.exists() else None


def elapsed(start: float) -> float:
    return round(time.perf_counter() - start, 3)


def process(plan_path: Path, db_uri: str, spec: ClipSpec, run_id: str, opts: dict,
            progress=None, suffix: str | None = None, storage: StorageConfig | None = None,
            policy: store.IndexPolicy | None = None) -> IngestCounts:
    """Stream the plan through Ray; commit chunk by chunk; ``progress(n_done)`` after each."""
    from tasks.models.clip import model_shape

    args = pipeline_args(spec, opts, storage)
    tables = store.open_tables(db_uri, model_shape(spec)[0], spec.label, suffix,
                               args["storage"])
    todo = pl.read_parquet(plan_path)
    start, counts = time.perf_counter(), Counter()
    for chunk in _stream(plan_path, todo, db_uri, spec, args):
        with store.writer_lock(db_uri, tables.images.name):
            counts += commit_chunk(tables, chunk, spec.label, run_id)
        if progress:
            progress(chunk.num_rows)
    with store.writer_lock(db_uri, tables.images.name):
        removed, built = finish(tables, todo, read_meta(plan_path), run_id, policy)
    log.info("indexes refreshed: %s", ", ".join(built) or "none")
    rejected = {k.split(":", 1)[1]: v for k, v in counts.items() if k.startswith("rejected:")}
    return IngestCounts(todo=todo.height, ingested=counts["ingested"],
                        duplicates=counts["duplicate"], rejected=rejected,
                        orphans_removed=removed, seconds=elapsed(start))
