"""The backfill flow: many dumps, one flow run, a bounded number of chunk tasks.

Each chunk is one Prefect task: it plans its dumps one by one with the ingest flow's own
``plan_source`` (listing + ledger anti-join), then streams all their plans through one Ray
Data pipeline (``tasks.ingest.backfill_run``): Ray starts once per run, the CLIP actor pool once per
chunk.  When a dump's last file is committed a ``backfills`` row says so; re-running the same
backfill id skips the dumps already ``done``, and the ``files`` ledger makes a half-done dump
resume where it stopped.  Another CLIP model is just another backfill into its own tables.
"""

from __future__ import annotations

import time
from pathlib import Path

from prefect import flow, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE

from flows import config
from flows.common import call as _call
from flows.common import in_flow_run as _in_flow_run
from flows.common import logger as _logger
from flows.common import run_id as _run_id
from flows.ingest import merge_counts, plan_source
from flows.progress import progress
from mmrag.settings import Settings
from schemas.tables import table_names, table_suffix
from tasks.ingest import backfill
from tasks.ingest import backfill_run as ingest_many
from tasks.ingest import run as ingest
from tasks.io import store
from tasks.io.cluster import init_ray
from tasks.io.objstore import StorageConfig
from tasks.models.clip import TINY_WARNING, model_shape

_TOTALS = ("seen", "ingested", "duplicates", "rejected")


def _storage(settings: Settings) -> StorageConfig:
    return config.storage(settings)


def _label(settings: Settings) -> str:
    return config.clip_spec(settings).label


def select_dumps(settings: Settings, roots: list[str] | None = None, root: str | None = None,
                 start: str | None = None, end: str | None = None,
                 from_ledger: bool = False) -> list[str]:
    """The dumps to backfill.  ``from_ledger``: every dump root in the ``files`` ledger of the
    profile's default model (the unsuffixed table set), i.e. "re-embed what we have"."""
    if from_ledger:
        if roots or root or start or end:
            raise backfill.BackfillError("--from-ledger takes its dumps from the ledger: "
                                         "give no dump folders, --root, --start or --end")
        dumps = backfill.ledger_roots(settings.db, "", _storage(settings))
        return backfill.resolve_dumps(dumps, None, None, None, _storage(settings))
    return backfill.resolve_dumps(roots, root, start, end, _storage(settings))


def plan_dump(dump: str, n: int, settings: Settings, run_id: str,
              rec: backfill.Recorder) -> dict | None:
    """Plan one dump (lists it, reads no image bytes); a dump that cannot be planned is
    recorded as failed (a re-run retries it), but a database problem stops the backfill."""
    rec.start(dump)
    try:
        plan_path, planned = plan_source(dump, settings, run_id, f"plan-{n:05d}.parquet")
    except store.StoreError:
        raise
    except Exception as e:  # noqa: BLE001 - recorded as failed; the next run retries the dump
        _logger().error("dump %s failed: %s", dump, e)
        rec.failed(dump, e)
        return None
    if not planned["todo"]:
        rec.done(dump, planned)
        return None
    return {"path": Path(plan_path), "planned": planned}


def embed_plans(plans: dict[str, dict], settings: Settings, run_id: str,
                rec: backfill.Recorder) -> None:
    """The chunk's plans through one Ray Data pipeline; each dump recorded when it is done."""
    spec = config.clip_spec(settings)
    init_ray(config.ray(settings))
    total = sum(p["planned"]["todo"] for p in plans.values())

    def finished(dump: str, done: dict) -> None:
        rec.done(dump, merge_counts(plans[dump]["planned"], done))

    try:
        with progress(total, "backfill chunk", _logger()) as advance:
            ingest_many.process_plans({d: p["path"] for d, p in plans.items()}, settings.db,
                                      spec, run_id, config.pipeline_opts(settings), finished,
                                      settings.table_suffix, _storage(settings), advance)
    except store.StoreError:
        raise
    except Exception as e:  # noqa: BLE001 - the unfinished dumps are failed; a re-run resumes
        _logger().error("chunk pipeline failed: %s", e)
        for dump in plans:
            if dump not in rec.rows:
                rec.failed(dump, e)


def refresh_indexes(settings: Settings) -> list[str]:
    """Indexes are rebuilt once per chunk rather than once per dump."""
    spec = config.clip_spec(settings)
    tables = store.open_tables(settings.db, model_shape(spec)[0], spec.label,
                               settings.table_suffix, _storage(settings))
    with store.writer_lock(settings.db, tables.images.name):
        return store.refresh_indexes(ingest.latest(tables), config.index_policy(settings))


@task(name="backfill-chunk", task_run_name="chunk-{index}", cache_policy=NO_CACHE)
def chunk_task(dumps: list[str], index: int, first: int, settings: Settings, backfill_id: str,
               run_id: str) -> list[dict]:
    """Plan the chunk's dumps one by one, then embed them all in one pipeline (one Ray and
    one CLIP actor pool for the chunk)."""
    rec = backfill.Recorder(settings.db, backfill_id, _label(settings), _storage(settings))
    plans = {d: p for i, d in enumerate(dumps)
             if (p := plan_dump(d, first + i, settings, run_id, rec)) is not None}
    if plans:
        embed_plans(plans, settings, run_id, rec)
    rows = [rec.rows[d] for d in dumps if d in rec.rows]
    if any(r["ingested"] or r["duplicates"] for r in rows):
        built = refresh_indexes(settings)
        _logger().info("chunk %d: indexes: %s", index, ", ".join(built) or "unchanged")
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
    done = backfill.done_dumps(settings.db, backfill_id, _storage(settings))
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
