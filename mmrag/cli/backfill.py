"""``mmrag backfill``: many dumps in one resumable run; also how to re-embed with a new model,
and (``--captions``) how an existing table gains its caption vectors without reading an image."""

from __future__ import annotations

from typing import Annotated

import typer

from mmrag.cli.app import app, fatal, run_flow, settings_from
from mmrag.cli.startup import start_server


@app.command("backfill")
def backfill(
    ctx: typer.Context,
    roots: Annotated[list[str] | None, typer.Argument(
        help="dump folders, processed in this order", show_default=False)] = None,
    root: Annotated[str | None, typer.Option(
        help="folder whose YYYY-MM-DD / YYYYMMDD sub-folders are the dumps")] = None,
    start: Annotated[str | None, typer.Option(help="first date (inclusive)")] = None,
    end: Annotated[str | None, typer.Option(help="last date (inclusive)")] = None,
    chunk_size: Annotated[int, typer.Option(help="dumps per Prefect task")] = 8,
    backfill_id: Annotated[str | None, typer.Option(
        help="resume key; default = hash of the dump list + CLIP model")] = None,
    from_ledger: Annotated[bool, typer.Option(
        help="the dumps already in the default model's ledger (to re-embed them)")] = False,
    captions: Annotated[bool, typer.Option(
        "--captions", help="no dumps: add caption vectors to the existing images table in "
        "place (captions only; no image is read)")] = False,
) -> None:
    """Ingest many dumps in one run; re-running the same command resumes it."""
    settings = settings_from(ctx)
    if captions:
        if roots or root or start or end or from_ledger:
            fatal("--captions embeds the captions already stored: give no dumps, --root, "
                  "--start, --end or --from-ledger")
        return backfill_captions(settings)
    params = dict(roots=roots or None, root=root, start=start, end=end, chunk_size=chunk_size,
                  backfill_id=backfill_id, from_ledger=from_ledger)
    server = start_server()
    from flows.backfill import backfill_flow, select_dumps
    from tasks.ingest.backfill import BackfillError, BackfillIncomplete
    from tasks.ingest.discover import SourceError
    from tasks.ingest.pipeline import PipelineError
    from tasks.io.store import StoreError

    try:
        keys = ("roots", "root", "start", "end", "from_ledger")
        select_dumps(settings, **{k: params[k] for k in keys})  # fail fast, before Prefect
        if chunk_size < 1:
            raise BackfillError("--chunk-size must be at least 1")
        summary = run_flow(settings.work_dir, backfill_flow, **params, settings=settings,
                           server=server)
    except BackfillIncomplete as e:
        print_summary(e.summary)
        typer.secho(f"error: {e}", fg="red", err=True)
        raise typer.Exit(1) from e
    except (BackfillError, SourceError, StoreError, PipelineError) as e:
        fatal(str(e))
    print_summary(summary)


def print_summary(summary: dict) -> None:
    lines = [
        f"backfill {summary['backfill_id']}: {summary['dumps']} dumps in {summary['chunks']} "
        f"chunks: {summary['dumps_done']} done, {summary['dumps_skipped']} already done, "
        f"{len(summary['failed'])} failed",
        f"  {summary['seen']} files seen, ingested {summary['ingested']}, duplicates "
        f"{summary['duplicates']}, rejected {summary['rejected']}",
        f"  {summary['seconds']} s -> {summary['db']} ({summary['images_table']}, "
        f"{summary['clip_model']})",
    ]
    if summary.get("tiny_profile"):
        lines.append("  NOTE: profile 'tiny' - random-weight CLIP, vectors are meaningless")
    typer.echo("\n".join(lines))


def backfill_captions(settings) -> None:
    """Upgrade the table in place and embed its captions; re-running resumes."""
    server = start_server()
    from flows.captions import caption_backfill_flow
    from tasks.io.store import StoreError

    try:
        summary = run_flow(settings.work_dir, caption_backfill_flow, settings, server=server)
    except (StoreError, ValueError, ImportError) as e:
        fatal(str(e))
    added = "columns added in place, " if summary["upgraded"] else (
        "column re-declared for a new width, " if summary["redeclared"] else "")
    typer.echo(f"caption vectors: {added}{summary['embedded']} of {summary['stale']} stale "
               f"captions embedded with {summary['caption_model']} in {summary['seconds']} s "
               f"-> {summary['db']} ({summary['images_table']})")
