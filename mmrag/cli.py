"""``mmrag`` command line: every option has an ``MMRAG_*`` variable and a flag."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Batch multimodal RAG over image dumps (Prefect + Ray + CLIP + LanceDB).")
_overrides: dict = {}


def _prefect_defaults() -> None:
    """Quiet, patient defaults for the ephemeral Prefect server: analytics on gives noisy sqlite
    lock errors, and the default 20 s start-up timeout is close on 2 cores."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")


@app.callback()
def main(
    db: Annotated[str | None, typer.Option(help="LanceDB URI [MMRAG_DB]")] = None,
    profile: Annotated[str | None, typer.Option(help="default | tiny [MMRAG_PROFILE]")] = None,
    clip_model: Annotated[str | None, typer.Option(help="open_clip model [MMRAG_CLIP_MODEL]")]
    = None,
    clip_pretrained: Annotated[str | None, typer.Option(
        help="pretrained tag or checkpoint path [MMRAG_CLIP_PRETRAINED]")] = None,
    precision: Annotated[str | None, typer.Option(help="auto|fp32|bf16|fp16")] = None,
    batch_size: Annotated[int | None, typer.Option(help="images per model batch")] = None,
    ray_address: Annotated[str | None, typer.Option(help="Ray cluster address")] = None,
) -> None:
    """Global options override the environment, which overrides defaults."""
    given = dict(db=db, profile=profile, clip_model=clip_model, clip_pretrained=clip_pretrained,
                 precision=precision, batch_size=batch_size, ray_address=ray_address)
    _overrides.update({k: v for k, v in given.items() if v is not None})


def _settings():
    from pydantic import ValidationError

    from mmrag.settings import Settings

    try:
        return Settings(**_overrides)
    except ValidationError as e:
        _fatal(f"invalid setting: {e.errors()[0]['loc'][0]}: {e.errors()[0]['msg']}")


def _fatal(message: str) -> None:
    typer.secho(f"error: {message}", fg="red", err=True)
    raise typer.Exit(2)


@app.command("sample-dump")
def sample_dump(
    directory: Path,
    n: Annotated[int, typer.Option("--n", help="number of images")] = 100,
    seed: Annotated[int, typer.Option(help="random seed (same seed, same bytes)")] = 0,
    with_bad: Annotated[bool, typer.Option(help="add one file per hostile-input kind")] = False,
) -> None:
    """Write a synthetic Place-Pulse-style dump (photo-like JPEGs + metadata.json)."""
    from tasks.sample_dump import generate_sample_dump, write_bad_inputs

    records = generate_sample_dump(directory, n, seed=seed)
    typer.echo(f"wrote {len(records)} images and metadata.json to {directory}")
    if with_bad:
        kinds = write_bad_inputs(directory, directory.parent / f"{directory.name}-outside")
        typer.echo(f"added {len(kinds)} hostile inputs: {', '.join(sorted(kinds))}")


@app.command("sample-queries")
def sample_queries(
    path: Path,
    dump: Annotated[Path, typer.Option(help="the sample dump the queries refer to")],
) -> None:
    """Write a demo JSONL queries file (all modes, filters, two bad rows on purpose)."""
    from tasks.sample_queries import write_sample_queries

    rows = write_sample_queries(path, dump)
    typer.echo(f"wrote {len(rows)} queries to {path}")


@app.command()
def ingest(
    source: Annotated[str, typer.Argument(help="dump folder (or object-store URL)")],
) -> None:
    """Embed the new images under SOURCE into LanceDB (incremental, idempotent)."""
    settings = _settings()
    _prefect_defaults()
    from flows.ingest import ingest_flow
    from tasks.discover import SourceError
    from tasks.embed import PipelineError
    from tasks.store import StoreError

    try:
        _preflight(source, settings)
        summary = _run_flow(ingest_flow, source, settings)
    except (SourceError, StoreError, PipelineError) as e:
        _fatal(str(e))
    _print_summary(summary)


def _preflight(source: str, settings) -> None:
    """Fail in a second, before Prefect and Ray start, when SOURCE or the DB is unusable."""
    from tasks import store
    from tasks.clip_model import model_shape
    from tasks.discover import open_source

    open_source(source)
    spec = settings.resolve_clip()
    store.open_tables(settings.db, model_shape(spec)[0], spec.label, settings.table_suffix)


@app.command()
def query(
    queries: Annotated[str, typer.Argument(help="queries file: .csv, .jsonl or .parquet")],
    run_id: Annotated[str | None, typer.Option(help="re-use to replace a run's output")] = None,
    run_date: Annotated[str | None, typer.Option(help="partition date YYYY-MM-DD")] = None,
    engine: Annotated[str | None, typer.Option(help="vllm | transformers | none | auto")]
    = None,
    out: Annotated[str | None, typer.Option(help="answers root [MMRAG_OUT]")] = None,
) -> None:
    """Retrieve images for each query and answer it with LLaVA; write answers as Parquet."""
    _overrides.update({k: v for k, v in dict(engine=engine, out=out).items() if v})
    settings = _settings()
    _prefect_defaults()
    from flows.query import query_flow
    from tasks.answers import check_writable
    from tasks.queries import QueryFileError
    from tasks.store import StoreError

    try:
        check_writable(settings.out, run_date)  # before Prefect starts: one line, no traceback
        summary = _run_flow(query_flow, queries, settings, run_id, run_date)
    except (QueryFileError, StoreError, ValueError, OSError) as e:
        _fatal(str(e))
    errors = ", ".join(f"{k}={v}" for k, v in sorted(summary["errors"].items())) or "none"
    typer.echo(f"run {summary['run_id']}: {summary['queries']} queries, {summary['answered']} "
               f"answered, errors: {errors}\n  images table version {summary['table_version']}"
               f" -> {summary['output']}")


def _run_flow(flow_, *args):
    """Run a flow; a Prefect server that cannot start is a one-line fatal error, not a trace."""
    try:
        return flow_(*args)
    except RuntimeError as e:
        if "server" in str(e).lower() and "prefect" in str(e).lower():
            _fatal(f"Prefect could not start or reach its server: {str(e).splitlines()[0]} "
                   "(raise PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS, or set "
                   "PREFECT_API_URL to a running server)")
        raise


def _print_summary(summary: dict) -> None:
    rejected = ", ".join(f"{k}={v}" for k, v in sorted(summary["rejected"].items())) or "none"
    lines = [
        f"run {summary['run_id']}: {summary['seen']} files seen, {summary['unchanged']} "
        f"unchanged, {summary['todo']} read",
        f"  ingested {summary.get('ingested', 0)}, duplicates {summary.get('duplicates', 0)}, "
        f"rejected: {rejected}",
        f"  {summary.get('seconds', 0)} s, {summary.get('images_per_s', 0)} images/s "
        f"-> {summary['db']}",
    ]
    if summary.get("tiny_profile"):
        lines.append("  NOTE: profile 'tiny' - random-weight CLIP, vectors are meaningless")
    typer.echo("\n".join(lines), file=sys.stdout)


__import__("mmrag.cli_backfill", fromlist=["register"]).register(app)  # mmrag backfill
__import__("mmrag.cli_ops", fromlist=["register"]).register(sys.modules[__name__])  # serve, status
__import__("mmrag.cli_eval", fromlist=["register"]).register(app)  # mmrag evaluate
__import__("mmrag.cli_report", fromlist=["register"]).register(app)  # report, schema
__import__("mmrag.cli_train", fromlist=["register"]).register(app)  # export-instructions, finetune

if __name__ == "__main__":
    app()
