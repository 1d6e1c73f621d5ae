"""``mmrag evaluate``: retrieval metrics on a labelled set, answer checks, one metrics file.

Search variants: ``--variant rerank=rerank_weight:0.5,rerank_depth:50`` (repeatable) evaluates
the settings' search options with those keys laid over them, next to ``default``; ``--spaces``
adds one variant per combination of hybrid spaces (image only, caption only, both, each with and
without full text).
"""

from __future__ import annotations

from typing import Annotated

import typer

from mmrag.cli.app import app, fatal, run_flow, settings_from
from mmrag.cli.startup import start_server

_COLUMNS = ("recall@1", "recall@5", "recall@10", "mrr")


@app.command("evaluate")
def evaluate(
    ctx: typer.Context,
    sample: Annotated[int, typer.Option(
        help="images drawn for the labelled set; 0 = answer checks only")] = 100,
    seed: Annotated[int, typer.Option(help="seed of the sample and augmentations")] = 0,
    answers: Annotated[str | None, typer.Option(
        help="answers run id (under --out) or answers .parquet file to check")] = None,
    clip_score: Annotated[bool, typer.Option(
        help="also CLIP cosine of query text and each retrieved image (re-embedded)")]
    = False,
    variant: Annotated[list[str] | None, typer.Option(
        help="NAME=key:value,key:value search options over the settings' (repeatable)")]
    = None,
    eval_id: Annotated[str | None, typer.Option(help="re-use to replace an evaluation")]
    = None,
    run_date: Annotated[str | None, typer.Option(help="partition date YYYY-MM-DD")] = None,
    out: Annotated[str | None, typer.Option(help="output root [MMRAG_OUT]")] = None,
    max_answer_chars: Annotated[int, typer.Option(
        help="answers longer than this count as too long")] = 600,
    augment: Annotated[str | None, typer.Option(
        help="comma list of crop,resize,jpeg,jitter,combined,identity (default: first 5)")]
    = None,
    spaces: Annotated[bool, typer.Option(
        "--spaces", help="also the hybrid space variants: image_only, caption_only, "
        "image+caption, image+text, caption+text, all")] = False,
) -> None:
    """Retrieval quality (recall@k, MRR) per search variant, plus answer checks.

    Tasks: text→image, image→image, hybrid, hybrid with an image, ANN vs exact; overall
    and per city. Writes out/metrics/run_date=…/{eval_id}.parquet.
    """
    settings = settings_from(ctx, out=out or None)
    params = dict(sample=sample, seed=seed, answers=answers, clip_score=clip_score,
                  eval_id=eval_id, run_date=run_date, max_answer_chars=max_answer_chars)
    _run(settings, params, [*(variant or []), *(_space_specs() if spaces else [])], augment)


def _space_specs() -> list[str]:
    from tasks.evaluate.retrieval import SPACE_VARIANTS

    return [f"{name}=spaces:{value}" for name, value in SPACE_VARIANTS.items()]


def _run(settings, params: dict, variant_specs: list[str], augment: str | None) -> None:
    server = start_server()
    from flows.evaluate import evaluate_flow
    from tasks.evaluate.answer_checks import AnswersNotFound
    from tasks.io.store import StoreError

    try:
        params["variants"] = _preflight(settings, params, variant_specs)
        params["augmentations"] = _kinds(augment)
        summary = run_flow(settings.work_dir, evaluate_flow, settings=settings, server=server,
                           **params)
    except (StoreError, AnswersNotFound, ValueError, OSError) as e:
        fatal(str(e))
    typer.echo(format_summary(summary))


def _preflight(settings, params: dict, specs: list[str]) -> dict[str, dict]:
    """Fail in a second, before Prefect starts: bad variants/ids/dates, no table, no answers."""
    from flows import config
    from tasks.evaluate.answer_checks import load_answers
    from tasks.evaluate.retrieval import resolve_variants
    from tasks.io.answers import validate_run_date, validate_run_id
    from tasks.models.clip import model_shape
    from tasks.query.retrieve import pin_images

    variants = resolve_variants(specs, config.search_options(settings))
    if params["eval_id"]:
        validate_run_id(params["eval_id"])
    if params["run_date"]:
        validate_run_date(params["run_date"])
    if params["sample"] < 0 or params["max_answer_chars"] < 1:
        raise ValueError("--sample must be >= 0 and --max-answer-chars >= 1")
    storage = config.storage(settings)
    if params["sample"] > 0 or params["clip_score"]:
        spec = config.clip_spec(settings)
        pin_images(settings.db, model_shape(spec)[0], spec.label, None, settings.table_suffix,
                   storage)
    if params["answers"]:
        load_answers(params["answers"], settings.out, storage)
    elif params["sample"] == 0:
        raise ValueError("nothing to evaluate: --sample 0 needs --answers")
    return variants


def _kinds(augment: str | None) -> list[str] | None:
    from tasks.evaluate.augment import IDENTITY, KINDS

    if augment is None:
        return None
    kinds = [k.strip() for k in augment.split(",") if k.strip()]
    unknown = sorted(set(kinds) - {*KINDS, IDENTITY})
    if unknown or not kinds:
        raise ValueError(f"--augment: unknown {unknown or 'empty'}; use {', '.join(KINDS)}, "
                         f"{IDENTITY}")
    return kinds


def _cell(value) -> str:
    return f"{value:.3f}" if isinstance(value, float) else "-" if value is None else str(value)


def format_summary(summary: dict) -> str:
    """The printed table: one line per (task, variant) over all cities, then answer checks."""
    lines = [f"evaluation {summary['eval_id']}: {summary['sampled']} sampled images"
             + (f", {summary['images_table']} version {summary['table_version']}"
                if summary.get("table_version") is not None else "")]
    if summary["headline"]:
        head = f"  {'task':<13}{'variant':<12}" + "".join(f"{c:>10}" for c in _COLUMNS)
        lines.append(head + f"{'queries':>9}{'errors':>8}")
        for h in summary["headline"]:
            cells = "".join(f"{_cell(h.get(c)):>10}" for c in _COLUMNS)
            note = f"  ({h['index']})" if h.get("index") else ""
            lines.append(f"  {h['task']:<13}{h['variant']:<12}{cells}"
                         f"{_cell(h.get('queries')):>9}{h['errors']:>8}{note}")
    if summary["answers"]:
        line = f"answers {summary['answers_run']}:"
        for k, v in summary["answers"].items():  # wrap between items, never inside one
            item = f" {k} {_cell(v)},"
            if len(line) + len(item) > 100:
                lines.append(line)
                line = " "
            line += item
        lines.append(line.rstrip(","))
    lines.append(f"  {summary['seconds']} s -> {summary['output']}")
    if summary.get("tiny_profile"):
        lines.append("  NOTE: profile 'tiny' - random-weight CLIP, the numbers test the "
                     "machinery, not retrieval quality")
    return "\n".join(lines)
