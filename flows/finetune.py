"""The finetune flow: re-export the instruction data from the current tables, then LoRA-train.

Thin on purpose: ``mmrag export-instructions`` and ``mmrag finetune`` already run the same
functions without Prefect.  What the flow adds is operational: a deployment on a GPU work pool
can retrain on a schedule or after ingests, each run is recorded with its parameters, and the
loss curve lands as a table artifact (``finetune-losses``) next to the run.
"""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

from prefect import flow, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE

from flows import config
from flows.common import call as _call
from flows.common import in_flow_run as _in_flow_run
from flows.common import logger as _logger
from mmrag.settings import Settings
from tasks.adapt.answer_records import select_answers
from tasks.adapt.export import export_instructions
from tasks.adapt.finetune import FinetuneConfig, finetune
from tasks.adapt.options import ExportOptions


@task(name="export-instructions", cache_policy=NO_CACHE)
def export_task(settings: Settings, dataset_dir: str, options: dict, answers: list[str],
                reviewed: str | None) -> dict:
    storage = config.storage(settings)
    frame = select_answers(settings.out, answers, reviewed, storage) if answers else None
    return export_instructions(settings.db, config.images_table(settings), dataset_dir,
                               ExportOptions(**options), frame, storage)


@task(name="finetune", cache_policy=NO_CACHE)
def finetune_task(settings: Settings, dataset_dir: str, output_dir: str, config: dict) -> dict:
    known = {f.name for f in fields(FinetuneConfig)}
    unknown = set(config) - known
    if unknown:
        raise ValueError(f"unknown finetune options: {sorted(unknown)}")
    config = {"base": settings.vlm_spec()[1]} | config
    if "target_modules" in config:
        config["target_modules"] = tuple(config["target_modules"])
    return finetune(dataset_dir, output_dir, FinetuneConfig(**config), settings.cache_dir)


@flow(name="finetune", log_prints=True)
def finetune_flow(dataset_dir: str, output_dir: str, config: dict | None = None,
                  settings: Settings | None = None, export: bool = True,
                  export_options: dict | None = None, answers: list[str] | None = None,
                  reviewed: str | None = None) -> dict:
    """``export`` (default) rebuilds DATASET_DIR from the current table first."""
    settings = settings or Settings()
    logger = _logger("mmrag.finetune")
    result: dict = {}
    if export:
        result["export"] = _call(export_task, settings, dataset_dir, export_options or {},
                                 answers or [], reviewed)
        logger.info("exported: %s", result["export"]["records"])
    summary = _call(finetune_task, settings, dataset_dir, output_dir, config or {})
    result["finetune"] = summary
    if _in_flow_run():
        create_table_artifact([{"step": i + 1, "loss": round(v, 5)}
                               for i, v in enumerate(summary["losses"])],
                              key="finetune-losses", description=f"adapter {summary['adapter']}")
    logger.info("finetune: %d steps, loss %.4f -> %.4f, adapter %s", summary["steps"],
                summary["losses"][0], summary["losses"][-1], Path(summary["adapter"]))
    return result
