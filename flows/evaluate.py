"""The evaluation flow: labelled set → searches per variant → metrics; optional answer checks
→ ``out/metrics/run_date=…/{eval_id}.parquet`` and a markdown artifact with the headline numbers.

Tasks pass file paths (the labelled set with its vectors, metric rows) between each other; the
images table is pinned once and every later task reads that version.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path

import polars as pl
from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from flows import config
from flows.common import call as _call
from flows.common import in_flow_run as _in_flow_run
from flows.common import logger as _logger
from flows.common import run_id as new_run_id
from mmrag.settings import Settings
from tasks.evaluate import answer_checks
from tasks.evaluate import retrieval as evaluate
from tasks.evaluate.augment import KINDS
from tasks.evaluate.labelled_set import labelled_queries, sample_images
from tasks.io import atomic
from tasks.io.answers import validate_run_id
from tasks.models.clip import TINY_WARNING, load_clip, model_shape
from tasks.query.retrieve import pin_images

HEADLINE = ("recall@1", "recall@5", "recall@10", "mrr")




def _pin(settings: Settings, version: int | None = None):
    spec = config.clip_spec(settings)
    text = config.text_spec(settings)
    pinned = pin_images(settings.db, model_shape(spec)[0], spec.label, version,
                        settings.table_suffix, config.storage(settings),
                        text.label if text else None)
    return spec, pinned


@task(name="eval-labelled-set", cache_policy=NO_CACHE)
def labelled_task(settings: Settings, sample: int, seed: int, kinds: list[str],
                  work: str) -> tuple[str, dict]:
    spec, pinned = _pin(settings)
    chosen = sample_images(pinned, sample, seed)
    if chosen.is_empty():
        _logger("mmrag.evaluate").warning("%s version %d is empty: no retrieval metrics",
                                          pinned.name, pinned.version)
    queries = labelled_queries(pinned, load_clip(spec), chosen, kinds, seed,
                               settings.max_image_pixels, config.storage(settings))
    path = Path(work) / "labelled.parquet"
    atomic.write_parquet(queries, path)
    info = {"table_version": pinned.version, "images_table": pinned.name,
            "clip_model": spec.label, "sampled": chosen.height, "queries": queries.height}
    return str(path), info


@task(name="eval-retrieval", cache_policy=NO_CACHE)
def retrieval_task(labelled: str, settings: Settings, variants: dict[str, dict],
                   version: int, work: str) -> str:
    spec, pinned = _pin(settings, version)
    queries = pl.read_parquet(labelled)
    if pinned.caption_note:
        _logger("mmrag.evaluate").warning("caption space left out: %s", pinned.caption_note)
    captions = evaluate.caption_vectors(pinned, queries, config.text_spec(settings))
    rows = evaluate.evaluate_retrieval(pinned, queries, variants, captions)
    prov = {"db": settings.db, "images_table": pinned.name, "table_version": pinned.version,
            "clip_model": spec.label}
    return _save([r | prov for r in rows], Path(work) / "retrieval-metrics.parquet")


@task(name="eval-answers", cache_policy=NO_CACHE)
def answers_task(ref: str, settings: Settings, max_chars: int, clip_score: bool,
                 work: str) -> str:
    storage = config.storage(settings)
    frame = answer_checks.load_answers(ref, settings.out, storage)
    rows = answer_checks.answer_checks(frame, max_chars)
    if clip_score:
        spec, pinned = _pin(settings)
        rows += answer_checks.clip_scores(frame, pinned.table, load_clip(spec),
                                          settings.max_image_pixels, storage)
    prov = answer_checks.provenance(frame)
    return _save([r | prov for r in rows], Path(work) / "answer-metrics.parquet")


def _save(rows: list[dict], path: Path) -> str:
    atomic.write_parquet(evaluate.metrics_table(rows), path)
    return str(path)


@task(name="eval-write", cache_policy=NO_CACHE)
def write_task(parts: list[str], settings: Settings, eval_id: str, run_date: str,
               extra: dict) -> tuple[str, list[dict]]:
    created = datetime.now(UTC)
    rows = [r | extra | {"eval_id": eval_id, "created_at": created}
            for part in parts for r in pl.read_parquet(part).to_dicts()]
    path = evaluate.write_metrics(rows, settings.out, run_date, eval_id,
                                  config.storage(settings))
    return path, rows


def headline(rows: list[dict]) -> list[dict]:
    """One line per (task, variant) over all cities: recall@1/5/10, MRR, queries, errors."""
    lines: dict[tuple, dict] = {}
    for r in rows:
        overall = r["subset"] is None or r["task"] == "ann_vs_exact"
        if r["task"] == "answers" or r["city"] is not None or not overall:
            continue
        line = lines.setdefault((r["task"], r["variant"]), {
            "task": r["task"], "variant": r["variant"], "index": None, "errors": 0})
        if r["metric"] == "errors":
            line["errors"] = int(r["value"])
        else:
            line[r["metric"]] = round(r["value"], 4)
            line["queries"] = r["n_queries"]
        if r["task"] == "ann_vs_exact":
            line["index"] = r["subset"]
    return list(lines.values())


def answer_summary(rows: list[dict]) -> dict:
    """Overall answer-check values by metric (error rates as ``error_rate:<stage>``)."""
    out = {}
    for r in rows:
        if r["task"] == "answers" and r["city"] is None:
            key = f"{r['metric']}:{r['subset']}" if r["subset"] else r["metric"]
            out[key] = int(r["value"]) if key.endswith("missing") else round(r["value"], 4)
    return out


def _markdown(summary: dict) -> str:
    cols = ["task", "variant", *HEADLINE, "queries", "errors"]
    lines = ["| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols)]
    for h in summary["headline"]:
        cells = {**h, "task": f"{h['task']} ({h['index']})" if h["index"] else h["task"]}
        lines.append("| " + " | ".join(str(cells.get(c, "")) for c in cols) + " |")
    text = f"evaluation `{summary['eval_id']}` of {summary.get('images_table')} version " \
           f"{summary.get('table_version')}, {summary['sampled']} sampled images\n\n"
    answers = "".join(f"\n- {k}: {v}" for k, v in summary["answers"].items())
    return text + "\n".join(lines) + (f"\n\nanswers {summary['answers_run']}:{answers}"
                                     if summary["answers"] else "")


@flow(name="evaluate", log_prints=True)
def evaluate_flow(settings: Settings | None = None, sample: int = 100, seed: int = 0,
                  variants: dict[str, dict] | None = None, answers: str | None = None,
                  clip_score: bool = False, eval_id: str | None = None,
                  run_date: str | None = None, max_answer_chars: int = 600,
                  augmentations: list[str] | None = None) -> dict:
    """Retrieval metrics on ``sample`` images per search variant (``default`` = the settings'
    options), plus checks of the answers run ``answers`` (run id or file); one Parquet file."""
    settings = settings or Settings()
    if sample <= 0 and not answers:
        raise ValueError("nothing to evaluate: give a sample size above 0 or an answers run")
    logger = _logger("mmrag.evaluate")
    if settings.is_tiny:
        logger.warning(TINY_WARNING + "; retrieval metrics measure the machinery only")
    began = time.perf_counter()
    eval_id = validate_run_id(eval_id or new_run_id())
    run_date = run_date or datetime.now(UTC).date().isoformat()
    variants = variants or {"default": config.search_options(settings)}
    work = str(Path(settings.work_dir) / f"evaluate-{eval_id}")
    parts, info = [], {"sampled": 0}
    if sample > 0:
        labelled, info = _call(labelled_task, settings, sample, seed,
                               list(augmentations or KINDS), work)
        parts.append(_call(retrieval_task, labelled, settings, variants,
                           info["table_version"], work))
    if answers:
        parts.append(_call(answers_task, answers, settings, max_answer_chars, clip_score, work))
    path, rows = _call(write_task, parts, settings, eval_id, run_date,
                       {"sample": info["sampled"], "seed": seed})
    summary = info | {"eval_id": eval_id, "run_date": run_date, "output": path,
                      "rows": len(rows), "headline": headline(rows),
                      "answers": answer_summary(rows), "answers_run": answers,
                      "seconds": round(time.perf_counter() - began, 3),
                      "tiny_profile": settings.is_tiny}
    if _in_flow_run():
        create_markdown_artifact(_markdown(summary), key="evaluation-summary",
                                 description=f"evaluation {eval_id}")
    logger.info("evaluation summary: %s", summary)
    return summary
