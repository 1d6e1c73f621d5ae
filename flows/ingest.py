"""The ingest flow: dump → ledger anti-join → Ray decode + CLIP → LanceDB.

Tasks receive paths, table URIs and settings, never image batches; the Ray pipeline runs
inside one coarse task (Prefect orchestrates, Ray distributes).
"""

from __future__ import annotations

import os
from pathlib import Path

from prefect import flow, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE

from flows.common import call as _call
from flows.common import in_flow_run as _in_flow_run
from flows.common import logger as _logger
from flows.common import run_id as _run_id
from mmrag.progress import progress
from mmrag.settings import Settings
from tasks import ingest
from tasks.clip_model import TINY_WARNING, model_shape
from tasks.embed import init_ray
from tasks.storage import StorageConfig


@task(name="plan", cache_policy=NO_CACHE)
def plan_task(source: str, settings: Settings, run_id: str) -> tuple[str, dict]:
    return plan_source(source, settings, run_id)


@task(name="embed-and-write", cache_policy=NO_CACHE)
def embed_task(plan_path: str, total: int, settings: Settings, run_id: str) -> dict:
    return embed_plan(plan_path, total, settings, run_id)


def plan_source(source: str, settings: Settings, run_id: str,
                plan_name: str = "plan.parquet") -> tuple[str, dict]:
    """List SOURCE and anti-join the ledger (no image bytes read); the plan goes to a file."""
    spec = settings.resolve_clip()
    plan_path = Path(settings.work_dir) / run_id / plan_name
    counts = ingest.prepare(source, settings.db, spec, model_shape(spec)[0], run_id, plan_path,
                            settings.table_suffix, StorageConfig.from_settings(settings))
    _logger("mmrag.ingest").info("%s: seen %d files, %d unchanged, %d to read", source, counts.seen,
                   counts.unchanged, counts.todo)
    return str(plan_path), counts.as_dict()


def pipeline_opts(settings: Settings) -> dict:
    """The Ray Data pipeline's knobs, from settings."""
    return dict(max_pixels=settings.max_image_pixels, batch_size=settings.batch_size,
                decode_batch_size=settings.decode_batch_size, actors=settings.embed_actors,
                actor_cpus=settings.embed_actor_cpus, decode_cpus=settings.decode_cpus,
                threads=settings.embed_threads or max(1, (settings.ray_num_cpus or os.cpu_count()
                                                          or 1) // settings.embed_actors),
                out_rows=settings.commit_rows)


def embed_plan(plan_path: str, total: int, settings: Settings, run_id: str) -> dict:
    """Run a plan through Ray (started once per process) and commit it chunk by chunk."""
    spec = settings.resolve_clip()
    init_ray(settings.ray_address, settings.ray_num_cpus, str(Path(settings.cache_dir) / "ray"))
    with progress(total, "ingest", _logger("mmrag.ingest")) as advance:
        counts = ingest.process(Path(plan_path), settings.db, spec, run_id,
                                pipeline_opts(settings), advance, settings.table_suffix,
                                storage=StorageConfig.from_settings(settings))
    return counts.as_dict()


def merge_counts(planned: dict, done: dict | None) -> dict:
    out = dict(planned)
    if done:
        rejected = dict(planned["rejected"])
        for stage, n in done["rejected"].items():
            rejected[stage] = rejected.get(stage, 0) + n
        out.update({k: done[k] for k in ("ingested", "duplicates", "orphans_removed", "seconds",
                                         "images_per_s")}, rejected=rejected)
    return out


@flow(name="ingest", log_prints=True)
def ingest_flow(source: str, settings: Settings | None = None) -> dict:
    """Ingest the images under SOURCE into the LanceDB database of ``settings.db``."""
    settings = settings or Settings()
    logger, run_id = _logger("mmrag.ingest"), _run_id()
    if settings.is_tiny:
        logger.warning(TINY_WARNING)
    plan_path, planned = _call(plan_task, source, settings, run_id)
    done = (_call(embed_task, plan_path, planned["todo"], settings, run_id)
            if planned["todo"] else None)
    summary = merge_counts(planned, done) | {"run_id": run_id, "source": source,
                                             "db": settings.db, "tiny_profile": settings.is_tiny}
    if _in_flow_run():
        create_table_artifact(
            [{"metric": k, "value": str(v)} for k, v in summary.items()],
            key="ingest-summary", description=f"ingest of {source}",
        )
    logger.info("ingest summary: %s", summary)
    return summary
