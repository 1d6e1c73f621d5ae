"""Several dumps' ingest plans through one Ray Data pipeline (a backfill chunk).

Starting a pipeline costs 8–9 s on 2 cores whatever its size — the CLIP actor's process
imports torch and loads the model (measured: 50 images took 8.5–9.3 s per dump, all of it
before the first batch came back) — so the dumps of one chunk share a pipeline.  Rows are
committed exactly as ``tasks.ingest.run.process`` commits them (``commit_chunk`` under the writer
lock: images, then rejects, then the ledger rows), and rows come back in plan order, so dumps
finish one after the other and each is reported (``on_done``) as soon as its last planned file
is committed.  A crash leaves the finished dumps reported and the rest resumable from the
ledger.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import polars as pl
import pyarrow as pa

from tasks.ingest.run import IngestCounts, close_dump, commit_chunk, elapsed, read_meta
from tasks.io import store
from tasks.io.objstore import StorageConfig
from tasks.models.clip import ClipSpec, model_shape


def process_plans(plans: dict[str, Path], db_uri: str, spec: ClipSpec, run_id: str, opts: dict,
                  on_done: Callable[[str, dict], None], suffix: str | None = None,
                  storage: StorageConfig | None = None, progress=None) -> None:
    """Embed and commit every plan (dump → plan file); ``on_done(dump, counts)`` per dump."""
    from tasks.ingest.pipeline import embed_files

    dim, size = model_shape(spec)
    storage = StorageConfig() if storage is None else storage
    tables = store.open_tables(db_uri, dim, spec.label, suffix, storage)
    todo = combined(plans)
    owner = dict(zip(todo["source_uri"], todo["_dump"], strict=True))
    left, counts = Counter(owner.values()), {d: Counter() for d in plans}
    start = time.perf_counter()
    with _preserve_order():
        stream = embed_files(todo.drop("escape", "_dump").to_arrow(), spec, image_size=size,
                             storage=storage, **opts)
        for chunk in stream:
            for dump, part in by_dump(chunk, owner):
                with store.writer_lock(db_uri, tables.images.name):
                    counts[dump] += commit_chunk(tables, part, spec.label, run_id)
                left[dump] -= part.num_rows
                if progress:
                    progress(part.num_rows)
                if not left[dump]:
                    mine = todo.filter(pl.col("_dump") == dump)
                    on_done(dump, _finish(tables, db_uri, mine, read_meta(plans[dump]),
                                          run_id, counts[dump], start))
    lost = {d: n for d, n in left.items() if n}
    if lost:
        raise RuntimeError(f"the pipeline returned fewer rows than planned: {lost}")


def combined(plans: dict[str, Path]) -> pl.DataFrame:
    """All plans in order, tagged with their dump; a file planned twice (nested dumps) once."""
    frames = [pl.read_parquet(p).with_columns(_dump=pl.lit(d)) for d, p in plans.items()]
    return pl.concat(frames, how="vertical_relaxed").unique("source_uri", keep="first",
                                                            maintain_order=True)


def by_dump(chunk: pa.Table, owner: dict[str, str]) -> Iterator[tuple[str, pa.Table]]:
    """Split a streamed chunk at dump boundaries (one LanceDB commit per dump part)."""
    dumps = [owner[u] for u in chunk.column("source_uri").to_pylist()]
    for dump in dict.fromkeys(dumps):
        yield dump, chunk.filter(pa.array([d == dump for d in dumps]))


def _finish(tables: store.Tables, db_uri: str, todo: pl.DataFrame, meta: pl.DataFrame | None,
            run_id: str, counts: Counter, start: float) -> dict:
    """Reconcile the images this dump's files hold or held (as ``tasks.ingest.run.finish``,
    indexes aside: the flow refreshes them once per chunk) and mark the dump done; its counts as
    the ingest flow has them."""
    with store.writer_lock(db_uri, tables.images.name):
        removed = close_dump(tables, todo, meta, run_id)
    rejected = {k.split(":", 1)[1]: v for k, v in counts.items() if k.startswith("rejected:")}
    total = counts["ingested"] + counts["duplicate"] + sum(rejected.values())
    return IngestCounts(todo=total, ingested=counts["ingested"], duplicates=counts["duplicate"],
                        rejected=rejected, orphans_removed=removed,
                        seconds=elapsed(start)).as_dict()


@contextmanager
def _preserve_order() -> Iterator[None]:
    """Rows in plan order, so dumps complete one after another (Ray Data's default is any
    order); the driver's setting is restored afterwards."""
    import ray.data

    options = ray.data.DataContext.get_current().execution_options
    before, options.preserve_order = options.preserve_order, True
    try:
        yield
    finally:
        options.preserve_order = before
