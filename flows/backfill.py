"""The backfill flow: many dumps, one flow run, a bounded number of chunk tasks.

Each chunk is one Prefect task that runs the ingest core (``flows.ingest.ingest_source``) for
its dumps one after the other in the same process, so Ray starts once and every dump reuses
it.  After each dump a ``backfills`` row says how it went; re-running the same backfill id
skips the dumps already ``done``, and the ``files`` ledger makes a half-done dump resume where
it stopped.  Another CLIP model is just another backfill: its vectors go to its own tables.
"""

from __future__ import annotations

import time

from prefect import flow, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE

from flows.ingest import _call, _in_flow_run, _logger, _run_id, ingest_source
from mmrag.settings import Settings
from schemas.tables import table_names, table_suffix
from tasks import backfill, store
from tasks.clip_model import TINY_WARNING, model_shape, resolve_spec

_TOTALS = ("seen", "ingested", "duplicates", "rejected")


def _label(settings: Settings) -> str:
    return resolve_spec(*settings.clip_spec(), settings.cache_dir, settings.precision).label


def select_dumps(settings: Settings, roots: list[str] | None = None, root: str | None = None,
                 start: str | None = None, end: str | None = None,
                 from_ledger: bool = False) -> list[str]:
    """The dumps to backfill.  ``from_ledger``: every dump root in the ``files`` ledger of the
    profile's default model (the unsuffixed table set), i.e. "re-embed what we have"."""
    if from_ledger:
        if roots or root or start or end:
            raise backfill.BackfillError("--from-ledger takes its dumps from the ledger: "
                                         "give no dump folders, --root, --start or --end")
        dumps = backfill.ledger_roots(settings.db, "")
        return backfill.resolve_dumps(dumps, None, None, None)
    return backfill.resolve_dumps(roots, root, start, end)


def run_dump(dump: str, index: int, settings: Settings, backfill_id: str, run_id: str) -> dict:
    """Ingest one dump and record the outcome; a failed dump is recorded, not fatal (a
    re-run retries it), but a database problem stops the backfill."""
    base = {"backfill_id": backfill_id, "dump": dump, "clip_model": _label(settings)}
    backfill.record(settings.db, base | {"status": "running"})
    start = time.perf_counter()
    try:
        counts = ingest_source(dump, settings, run_id, f"plan-{index:05d}.parquet",
                               refresh=False)
    except store.StoreError:
        raise
    except Exception as e:  # noqa: BLE001 - recorded as failed; the next run retries the dump
        _logger().error("dump %s failed: %s", dump, e)
        row = base | {"status": "failed", "error": f"{type(e).__name__}: {e}"[:2000]}
    else:
        row = base | {"status": "done", "seen": counts["seen"],
                      "ingested": counts.get("ingested", 0),
                      "duplicates": counts.get("duplicates", 0),
                      "rejected": sum(counts["rejected"].values())}
    row["seconds"] = round(time.perf_counter() - start, 3)
    backfill.record(settings.db, row)
    return row


def refresh_indexes(settings: Settings) -> list[str]:
    """Indexes are rebuilt once per chunk rather than once per dump."""
    spec = resolve_spec(*settings.clip_spec(), settings.cache_dir, settings.precision)
    tables = store.open_tables(settings.db, model_shape(spec)[0], spec.label,
                               settings.table_suffix)
    with store.writer_lock(settings.db, tables.images.name):
        return store.refresh_indexes(tables)


@task(name="backfill-chunk", task_run_name="chunk-{index}", cache_policy=NO_CACHE)
def chunk_task(dumps: list[str], index: int, first: int, settings: Settings, backfill_id: str,
               run_id: str) -> list[dict]:
    """The dumps of one chunk, sequentially, in this process (one Ray for all of them)."""
    rows = [run_dump(d, first + i, settings, backfill_id, run_id) for i, d in enumerate(dumps)]
    if any(r["ingested"] or r["duplicates"] for r in rows):
        built = refresh_indexes(settings)
        _logger().info("chunk %d: indexes refreshed: %s", index, ", ".join(built) or "none")
    return rows


def totals(rows: list[dict], skipped: int) -> dict:
    out = {k: sum(r[k] for r in rows) for k in _TOTALS}
    out["dumps_done"] = sum(r["status"] == "done" for r in rows)
    out["failed"] = [r["dump"] for r in rows if r["status"] == "failed"]
    return out | {"dumps_skipped": skipped}


@flow(name="backfill", log_prints=True)
def backfill_flow(roots: list[str] | None = None, root: str | None = None,
                  start: str | None = None, end: str | None = None, chunk_size: int = 8,
                  backfill_id: str | None = None, from_ledger: bool = False,
                  settings: Settings | None = None) -> dict:
    """Ingest many dumps (ROOTS, or ROOT's date folders within [start, end]) in chunks."""
    settings = settings or Settings()
    logger, run_id, began = _logger(), _run_id(), time.perf_counter()
    if settings.is_tiny:
        logger.warning(TINY_WARNING)
    dumps = select_dumps(settings, roots, root, start, end, from_ledger)
    label = _label(settings)
    backfill_id = backfill_id or backfill.default_backfill_id(dumps, label)
    done = backfill.done_dumps(settings.db, backfill_id)
    todo = [d for d in dumps if d not in done]
    chunks = backfill.chunked(todo, chunk_size)
    logger.info("backfill %s: %d dumps, %d already done, %d chunks", backfill_id, len(dumps),
                len(dumps) - len(todo), len(chunks))
    rows, first = [], 0
    for index, chunk in enumerate(chunks):
        rows += _call(chunk_task, chunk, index, first, settings, backfill_id, run_id)
        first += len(chunk)
    summary = _summary(rows, dumps, todo, chunks, settings, label) | {
        "backfill_id": backfill_id, "run_id": run_id,
        "seconds": round(time.perf_counter() - began, 3)}
    _publish(summary, rows)
    if summary["failed"]:
        raise backfill.BackfillIncomplete(summary)
    return summary


def _summary(rows, dumps, todo, chunks, settings: Settings, label: str) -> dict:
    suffix = table_suffix(label) if settings.table_suffix is None else settings.table_suffix
    return totals(rows, len(dumps) - len(todo)) | {
        "dumps": len(dumps), "chunks": len(chunks), "db": settings.db, "clip_model": label,
        "images_table": table_names(suffix)[0], "tiny_profile": settings.is_tiny}


def _publish(summary: dict, rows: list[dict]) -> None:
    """Log the totals; in a flow run, also a table artifact with one row per dump."""
    _logger().info("backfill summary: %s", summary)
    if _in_flow_run():
        table = [{k: str(r.get(k, "")) for k in ("dump", "status", *_TOTALS, "seconds", "error")}
                 for r in rows]
        create_table_artifact(table or [{"dump": "(all dumps already done)"}],
                              key="backfill-summary",
                              description=f"backfill {summary['backfill_id']}: "
                                          f"{summary['dumps_done']} dumps done, "
                                          f"{len(summary['failed'])} failed, "
                                          f"{summary['dumps_skipped']} skipped")
