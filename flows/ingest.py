"""The ingest flow: dump → ledger anti-join → Ray decode + CLIP → LanceDB.

Tasks receive paths, table URIs and settings, never image batches; the Ray pipeline runs
inside one coarse task (Prefect orchestrates, Ray distributes).
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE

from flows import config
from flows.captions import refresh_task
from flows.common import call as _call
from flows.common import in_flow_run as _in_flow_run
from flows.common import logger as _logger
from flows.common import run_id as _run_id
from flows.progress import progress
from mmrag.settings import Settings
from tasks.ingest import run as ingest
from tasks.io.cluster import init_ray
from tasks.models.clip import TINY_WARNING, model_shape


@task(name="plan", cache_policy=NO_CACHE)
def plan_task(source: str, settings: Settings, run_id: str,
              allow_deletes: bool = False) -> tuple[str, dict]:
    return plan_source(source, settings, run_id, allow_deletes=allow_deletes)


@task(name="embed-and-write", cache_policy=NO_CACHE)
def embed_task(plan_path: str, total: int, settings: Settings, run_id: str) -> dict:
    return embed_plan(plan_path, total, settings, run_id)


def plan_source(source: str, settings: Settings, run_id: str,
                plan_name: str = "plan.parquet", allow_deletes: bool = False) -> tuple[str, dict]:
    """List SOURCE and compare it with the ledger; apply moves, deletions and metadata changes
    (no image embedded); the plan of files to embed goes to a file."""
    spec = config.clip_spec(settings)
    plan_path = Path(settings.work_dir) / run_id / plan_name
    counts = ingest.prepare(source, settings.db, spec, model_shape(spec)[0], run_id, plan_path,
                            settings.table_suffix, config.storage(settings),
                            config.change_options(settings, allow_deletes),
                            config.index_policy(settings))
    _logger("mmrag.ingest").info(
        "%s: seen %d files, %d unchanged, %d to read; metadata updated %d, files deleted %d "
        "(images %d), moved %d", source, counts.seen, counts.unchanged, counts.todo,
        counts.metadata_updated, counts.deleted, counts.images_deleted, counts.moved)
    return str(plan_path), counts.as_dict()


def embed_plan(plan_path: str, total: int, settings: Settings, run_id: str) -> dict:
    """Run a plan through Ray (started once per process) and commit it chunk by chunk."""
    spec = config.clip_spec(settings)
    init_ray(config.ray(settings))
    with progress(total, "ingest", _logger("mmrag.ingest")) as advance:
        counts = ingest.process(Path(plan_path), settings.db, spec, run_id,
                                config.pipeline_opts(settings), advance, settings.table_suffix,
                                storage=config.storage(settings),
                                policy=config.index_policy(settings))
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
def ingest_flow(source: str, settings: Settings | None = None,
                allow_deletes: bool = False) -> dict:
    """Ingest the images under SOURCE into the LanceDB database of ``settings.db``.

    ``allow_deletes``: apply deletions even above ``max_delete_fraction`` (this run only)."""
    settings = settings or Settings()
    logger, run_id = _logger("mmrag.ingest"), _run_id()
    if settings.is_tiny:
        logger.warning(TINY_WARNING)
    plan_path, planned = _call(plan_task, source, settings, run_id, allow_deletes)
    done = (_call(embed_task, plan_path, planned["todo"], settings, run_id)
            if planned["todo"] else None)
    if done or planned["metadata_updated"] or planned["moved"]:
        planned = planned | {"captions_embedded": _call(refresh_task, settings)
                             .get("embedded", 0)}
    summary = merge_counts(planned, done) | {"run_id": run_id, "source": source,
                                             "db": settings.db, "tiny_profile": settings.is_tiny}
    if _in_flow_run():
        create_table_artifact(
            [{"metric": k, "value": str(v)} for k, v in summary.items()],
            key="ingest-summary", description=f"ingest of {source}",
        )
    logger.info("ingest summary: %s", summary)
    return summary
