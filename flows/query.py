"""The query flow: queries file → embed → bulk search at a pinned version → prompts → VLM →
``out/answers/run_date=…/{run_id}.parquet``.

The Prefect task is the Ray driver: it reads the queries, searches LanceDB and writes the
answers; large queries files are embedded, and every prompt is built and answered, on Ray
(the local Ray, or the cluster at ``MMRAG_RAY_ADDRESS``).

Tasks pass file paths; each writes its result next to the run's other scratch files, so a
re-run of the same ``run_id`` redoes only what is missing and replaces the output atomically.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path

from prefect import flow, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE

from flows import config
from flows.common import call as _call
from flows.common import in_flow_run as _in_flow_run
from flows.common import logger as _logger
from flows.common import run_id as new_run_id
from flows.progress import progress
from mmrag.settings import Settings
from tasks.io import atomic
from tasks.io.answers import check_writable, write_answers
from tasks.io.cluster import init_ray
from tasks.models.clip import TINY_WARNING
from tasks.models.engines import ADAPTER_ENGINE
from tasks.query import run as rag
from tasks.query.queries import read_queries


@task(name="read-queries", cache_policy=NO_CACHE)
def plan_task(queries: str, settings: Settings, work: str) -> str:
    roots = [*settings.query_image_roots, str(Path(queries).resolve().parent)]
    plan, warnings = read_queries(queries, image_roots=roots, default_top_k=settings.top_k,
                                  max_top_k=settings.max_top_k)
    for w in warnings:
        _logger("mmrag.query").warning(w)
    path = Path(work) / "queries.parquet"
    atomic.write_parquet(plan, path)
    return str(path)


@task(name="retrieve", cache_policy=NO_CACHE)
def retrieve_task(plan_path: str, settings: Settings, work: str) -> tuple[str, dict]:
    spec = config.clip_spec(settings)
    out = Path(work) / "retrieved.parquet"
    init_ray(config.ray(settings))
    stats = rag.retrieve(Path(plan_path), out, settings.db, spec, settings.max_image_pixels,
                         config.search_options(settings), settings.table_suffix,
                         config.storage(settings), config.ray_embed(settings),
                         config.text_spec(settings))
    _logger("mmrag.query").info("retrieved at %s version %d: %s", settings.db,
                                stats["table_version"], stats)
    return str(out), stats


@task(name="generate", cache_policy=NO_CACHE)
def generate_task(retrieved: str, settings: Settings, run_id: str, run_date: str,
                  total: int) -> tuple[str, dict]:
    engine = config.engine_config(settings)
    name, model = engine.name, engine.model
    if engine.adapter and name == "vllm":  # refused before any replica starts
        raise ValueError(ADAPTER_ENGINE)
    if settings.vlm_adapter and name != "none":  # answers record which adapter spoke
        model = f"{model}+{settings.vlm_adapter}"
    storage = config.storage(settings)
    init_ray(config.ray(settings))
    with progress(total, "generate", _logger("mmrag.query")) as advance:
        rows = rag.respond(Path(retrieved), engine, model, run_id,
                           config.generate_options(settings), advance, storage)
    path = write_answers(rows, settings.out, run_date, run_id, storage)
    return path, rag.summary(rows) | {"engine": name, "vlm_model": model}


@flow(name="query", log_prints=True)
def query_flow(queries: str, settings: Settings | None = None, run_id: str | None = None,
               run_date: str | None = None) -> dict:
    """Answer every query in QUERIES from the ``images`` table; write one Parquet file."""
    settings = settings or Settings()
    logger = _logger("mmrag.query")
    if settings.is_tiny:
        logger.warning(TINY_WARNING + "; the tiny LLaVA's answers are random text")
    began = time.perf_counter()
    run_id = run_id or new_run_id()
    run_date = run_date or datetime.now(UTC).date().isoformat()
    work = str(Path(settings.work_dir) / f"query-{run_id}")
    check_writable(settings.out, run_date)
    plan_path = _call(plan_task, queries, settings, work)
    retrieved, stats = _call(retrieve_task, plan_path, settings, work)
    good = stats["queries"] - stats["bad_rows"] - stats["retrieve_errors"]
    path, result = _call(generate_task, retrieved, settings, run_id, run_date, good)
    seconds = round(time.perf_counter() - began, 3)
    summary = stats | result | {"run_id": run_id, "run_date": run_date, "output": path,
                                "seconds": seconds,
                                "queries_per_s": round(stats["queries"] / max(seconds, 1e-9), 2)}
    if _in_flow_run():
        create_table_artifact([{"metric": k, "value": str(v)} for k, v in summary.items()],
                              key="query-summary", description=f"query run {run_id}")
    logger.info("query summary: %s", summary)
    return summary

