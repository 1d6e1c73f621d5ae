"""The finetune flow: re-export the instruction data from the current tables, then LoRA-train.

Thin on purpose: ``mmrag export-instructions`` and ``mmrag finetune`` already run the same
functions without Prefect.  What the flow adds is operational: a deployment on a GPU work pool
can retrain on a schedule or after ingests, each run is recorded with its parameters, training
progress shows in the UI while it runs (a ``finetune-progress`` artifact, as for ingest), and
the loss curve lands as a table artifact (``finetune-losses``) next to the run.

A flow run trains in one process, so on one GPU (give the worker ``CUDA_VISIBLE_DEVICES``);
several GPUs are the CLI's under ``torchrun`` / ``accelerate launch``.  A re-run of the
deployment with the same ``output_dir`` resumes from that folder's last checkpoint.
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import fields
from pathlib import Path

from prefect import flow, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE

from flows import config
from flows.common import call as _call
from flows.common import in_flow_run as _in_flow_run
from flows.common import logger as _logger
from flows.progress import progress
from mmrag.settings import Settings
from tasks.adapt.answer_records import select_answers
from tasks.adapt.export import export_instructions
from tasks.adapt.finetune import CHECKPOINTS_DIR, FinetuneConfig, finetune, last_checkpoint
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
    with TrainingProgress() as tracker:
        return finetune(dataset_dir, output_dir, FinetuneConfig(**config), settings.cache_dir,
                        callbacks=[tracker.callback()])


class TrainingProgress:
    """Optimizer steps → ``flows.progress``: a terminal bar or log lines, and inside a Prefect
    run the ``finetune-progress`` artifact the UI shows, as ingest does.

    ``callback()`` is the ``TrainerCallback`` handed to the training stage (stages do not import
    flows).  Only the first process of a multi-GPU run reports; a resumed run starts at the
    checkpoint's step.  Leaving the ``with`` block closes the bar even if training failed."""

    def __init__(self, label: str = "finetune", logger=None):
        self.label, self.logger = label, logger or _logger("mmrag.finetune")
        self._stack: ExitStack | None = None
        self._advance = None

    def __enter__(self) -> TrainingProgress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self, total: int, done: int = 0) -> None:
        self.close()
        self._stack = ExitStack()
        self._advance = self._stack.enter_context(progress(total, self.label, self.logger))
        if done:
            self._advance(done)

    def advance(self, n: int = 1) -> None:
        if self._advance is not None:
            self._advance(n)

    def close(self) -> None:
        if self._stack is not None:
            self._stack.close()
        self._stack, self._advance = None, None

    def callback(self):
        from transformers import TrainerCallback

        tracker = self

        class ProgressCallback(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):
                if state.is_world_process_zero:
                    tracker.start(state.max_steps, state.global_step)

            def on_step_end(self, args, state, control, **kwargs):
                tracker.advance(1)

            def on_train_end(self, args, state, control, **kwargs):
                tracker.close()

        return ProgressCallback()


@flow(name="finetune", log_prints=True)
def finetune_flow(dataset_dir: str, output_dir: str, config: dict | None = None,
                  settings: Settings | None = None, export: bool = True,
                  export_options: dict | None = None, answers: list[str] | None = None,
                  reviewed: str | None = None) -> dict:
    """``export`` (default) rebuilds DATASET_DIR from the current table first, unless OUTPUT_DIR
    holds checkpoints: then the run resumes on the dataset as it was exported."""
    settings = settings or Settings()
    logger = _logger("mmrag.finetune")
    result: dict = {}
    resuming = (config or {}).get("resume") is not False and last_checkpoint(
        Path(output_dir) / CHECKPOINTS_DIR) is not None
    if export and resuming:  # the records under a resumed run must not change
        logger.info("%s holds checkpoints: resuming on the dataset as exported", output_dir)
    elif export:
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
