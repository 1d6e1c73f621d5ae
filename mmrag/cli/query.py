"""``mmrag query``: answer a queries file into the answers Parquet dataset."""

from __future__ import annotations

from typing import Annotated

import typer

from mmrag.cli.app import app, counts, fatal, run_flow, settings_from
from mmrag.cli.startup import start_server


@app.command()
def query(
    ctx: typer.Context,
    queries: Annotated[str, typer.Argument(help="queries file: .csv, .jsonl or .parquet")],
    run_id: Annotated[str | None, typer.Option(help="re-use to replace a run's output")] = None,
    run_date: Annotated[str | None, typer.Option(help="partition date YYYY-MM-DD")] = None,
    engine: Annotated[str | None, typer.Option(help="vllm | transformers | none | auto")]
    = None,
    out: Annotated[str | None, typer.Option(help="answers root [MMRAG_OUT]")] = None,
) -> None:
    """Retrieve images for each query and answer it with LLaVA; write answers as Parquet."""
    settings = settings_from(ctx, engine=engine or None, out=out or None)
    server = start_server()
    from flows import early
    from tasks.io.answers import check_writable
    from tasks.io.store import StoreError
    from tasks.query.generate import GenerationError
    from tasks.query.queries import QueryFileError

    try:  # before Prefect starts: one line, no traceback
        check_writable(settings.out, run_date)
        early.start_ray(settings)
        from flows.query import query_flow

        summary = run_flow(settings.work_dir, query_flow, queries, settings, run_id, run_date,
                           server=server)
    except (QueryFileError, StoreError, GenerationError, ValueError, OSError) as e:
        fatal(str(e))
    typer.echo(f"run {summary['run_id']}: {summary['queries']} queries, {summary['answered']} "
               f"answered, errors: {counts(summary['errors'])}\n  images table version "
               f"{summary['table_version']} -> {summary['output']}")
