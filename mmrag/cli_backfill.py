"""``mmrag backfill``: many dumps in one resumable run; also how to re-embed with a new model.

Registered on the main app by ``register(app)`` (one line in ``mmrag/cli.py``).  The command
reaches the global options through the module that owns ``app`` — ``mmrag.cli``, or
``__main__`` under ``python -m mmrag.cli`` — so ``--db``/``--profile`` work either way.
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer


def register(app: typer.Typer) -> None:
    """Add the ``backfill`` command to ``app``."""
    cli = sys.modules[app.registered_callback.callback.__module__]

    @app.command("backfill")
    def backfill(
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
    ) -> None:
        """Ingest many dumps in one run; re-running the same command resumes it."""
        _run(cli, dict(roots=roots or None, root=root, start=start, end=end,
                       chunk_size=chunk_size, backfill_id=backfill_id, from_ledger=from_ledger))


def _run(cli, params: dict) -> None:
    settings = cli._settings()
    from flows.backfill import backfill_flow, select_dumps
    from tasks.backfill import BackfillError, BackfillIncomplete
    from tasks.discover import SourceError
    from tasks.embed import PipelineError
    from tasks.store import StoreError

    try:
        keys = ("roots", "root", "start", "end", "from_ledger")
        select_dumps(settings, **{k: params[k] for k in keys})  # fail fast, before Prefect
        if params["chunk_size"] < 1:
            raise BackfillError("--chunk-size must be at least 1")
        cli._prefect_defaults()
        summary = backfill_flow(**params, settings=settings)
    except BackfillIncomplete as e:
        _print(e.summary)
        typer.secho(f"error: {e}", fg="red", err=True)
        raise typer.Exit(1) from e
    except (BackfillError, SourceError, StoreError, PipelineError) as e:
        cli._fatal(str(e))
    _print(summary)


def _print(summary: dict) -> None:
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
