"""``mmrag ingest`` and the sample-data commands (``sample-dump``, ``sample-queries``)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mmrag.cli.app import app, counts, fatal, run_flow, settings_from
from mmrag.cli.startup import start_server


@app.command("sample-dump")
def sample_dump(
    directory: Path,
    n: Annotated[int, typer.Option("--n", help="number of images")] = 100,
    seed: Annotated[int, typer.Option(help="random seed (same seed, same bytes)")] = 0,
    with_bad: Annotated[bool, typer.Option(help="add one file per hostile-input kind")] = False,
) -> None:
    """Write a synthetic Place-Pulse-style dump (photo-like JPEGs + metadata.json)."""
    from mmrag.samples.dump import generate_sample_dump, write_bad_inputs

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
    from mmrag.samples.queries import write_sample_queries

    rows = write_sample_queries(path, dump)
    typer.echo(f"wrote {len(rows)} queries to {path}")


@app.command()
def ingest(
    ctx: typer.Context,
    source: Annotated[str, typer.Argument(help="dump folder (or object-store URL)")],
    allow_deletes: Annotated[bool, typer.Option(
        "--allow-deletes", help="apply deletions even when more than MMRAG_MAX_DELETE_FRACTION "
        "of the dump's known files are gone (this run only)")] = False,
) -> None:
    """Embed the new images under SOURCE into LanceDB and apply what changed (metadata, deleted
    and moved files): incremental, idempotent."""
    settings = settings_from(ctx)
    server = start_server()
    from flows import early
    from tasks.ingest.changes import DeletionRefused
    from tasks.ingest.discover import SourceError
    from tasks.ingest.pipeline import PipelineError
    from tasks.io.store import StoreError

    try:
        preflight(source, settings)
        early.start(source, settings)
        from flows.ingest import ingest_flow

        summary = run_flow(settings.work_dir, ingest_flow, source, settings, allow_deletes,
                           server=server)
    except (SourceError, StoreError, PipelineError, DeletionRefused) as e:
        fatal(str(e))
    finally:
        early.cool_down()
    print_summary(summary)


def preflight(source: str, settings) -> None:
    """Fail in a second, before Prefect and Ray start, when SOURCE or the DB is unusable."""
    from flows import config
    from tasks.ingest.discover import open_source
    from tasks.io import store
    from tasks.models.clip import model_shape

    storage = config.storage(settings)
    open_source(source, storage)
    spec = config.clip_spec(settings)
    store.open_tables(settings.db, model_shape(spec)[0], spec.label, settings.table_suffix,
                      storage)


def print_summary(summary: dict) -> None:
    lines = [
        f"run {summary['run_id']}: {summary['seen']} files seen, {summary['unchanged']} "
        f"unchanged, {summary['todo']} read",
        f"  ingested {summary.get('ingested', 0)}, duplicates {summary.get('duplicates', 0)}, "
        f"rejected: {counts(summary['rejected'])}",
        f"  {summary.get('seconds', 0)} s, {summary.get('images_per_s', 0)} images/s "
        f"-> {summary['db']}",
    ]
    changed = [summary.get(k, 0) for k in ("metadata_updated", "deleted", "images_deleted",
                                           "moved")]
    if any(changed):
        lines.insert(2, f"  metadata updated {changed[0]}, files deleted {changed[1]} "
                        f"(images removed {changed[2]}), moved {changed[3]}")
    if summary.get("tiny_profile"):
        lines.append("  NOTE: profile 'tiny' - random-weight CLIP, vectors are meaningless")
    typer.echo("\n".join(lines))
