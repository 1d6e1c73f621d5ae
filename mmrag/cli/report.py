"""``mmrag report`` (HTML reports) and ``mmrag schema`` (the data dictionary).

Both commands only read the database and the answers; neither starts Prefect, Ray or a model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mmrag.cli.app import app, fatal, settings_from


@app.command("report")
def report(
    ctx: typer.Context,
    run_id: Annotated[str | None, typer.Argument(help="query run to report on")] = None,
    overview: Annotated[bool, typer.Option(
        "--overview", help="also (or only) write the images-table overview")] = False,
    out: Annotated[str | None, typer.Option(help="answers root [MMRAG_OUT]")] = None,
    out_dir: Annotated[str | None, typer.Option(
        help="folder for the HTML files [default: MMRAG_OUT/reports]")] = None,
    html: Annotated[str | None, typer.Option(
        help="path of the HTML file (one report only)")] = None,
    image_root: Annotated[list[str] | None, typer.Option(
        help="extra folder thumbnails may be read from (repeatable)")] = None,
    table: Annotated[str | None, typer.Option(
        help="images table for --overview [default: images + MMRAG_TABLE_SUFFIX]")] = None,
    max_queries: Annotated[int, typer.Option(min=1, help="queries shown")] = 200,
) -> None:
    """Write a self-contained HTML report of a query run and/or the images table."""
    settings = settings_from(ctx, out=out or None)
    if not run_id and not overview:
        fatal("give a RUN_ID, --overview, or both")
    if html and run_id and overview:
        fatal("--html names one file: write the two reports with --out-dir instead")
    from flows import config

    storage = config.storage(settings)
    roots = [*settings.query_image_roots, *(image_root or [])]
    folder = out_dir or f"{settings.out.rstrip('/')}/reports"
    if run_id:
        _run_report(settings, run_id, html or f"{folder}/{run_id}.html", roots,
                    max_queries, storage)
    if overview:
        name = table or "images" + (settings.table_suffix or "")
        _overview(settings, name, html or f"{folder}/{name}-overview.html", roots,
                  storage)

@app.command("schema")
def schema(
    table: Annotated[str | None, typer.Argument(help="one table; default all")] = None,
    fmt: Annotated[str, typer.Option("--format", help="markdown | json")] = "markdown",
    readme: Annotated[Path | None, typer.Option(
        help="rewrite the generated block of this README instead of printing")] = None,
) -> None:
    """Print the data dictionary of every table and file mmrag writes (from schemas/)."""
    from schemas import dictionary

    try:
        if readme is not None:
            changed = dictionary.update_readme(readme)
            typer.echo(f"{readme}: data dictionary {'updated' if changed else 'unchanged'}")
            return
        if fmt not in ("markdown", "json"):
            fatal(f"--format {fmt!r}: expected markdown or json")
        render = dictionary.markdown if fmt == "markdown" else dictionary.as_json
        typer.echo(render(table), nl=False)
    except (KeyError, ValueError) as e:
        fatal(str(e.args[0] if e.args else e))


def _run_report(settings, run_id, path, roots, max_queries, storage) -> None:
    from tasks.report.run import RunNotFound, build_run_report

    try:
        html, s = build_run_report(settings.out, run_id, db=settings.db, image_roots=roots,
                                   max_queries=max_queries, max_pixels=settings.max_image_pixels,
                                   storage=storage)
    except (RunNotFound, ValueError) as e:
        fatal(str(e))
    _write(path, html, storage)
    typer.echo(f"run {run_id}: {s['queries']} queries ({s['shown']} shown), {s['thumbnails']} "
               f"thumbnails, {s['boxes']} boxes -> {path}")


def _overview(settings, table, path, roots, storage) -> None:
    from tasks.report.overview import DatabaseNotFound, build_overview

    try:
        html, s = build_overview(settings.db, table, image_roots=roots,
                                 max_pixels=settings.max_image_pixels, storage=storage)
    except DatabaseNotFound as e:
        fatal(str(e))
    _write(path, html, storage)
    rejects = ", ".join(f"{k}={v}" for k, v in sorted(s["rejects"].items())) or "none"
    typer.echo(f"{table}: {s['images']} images, {s['cities']} cities, rejects: {rejects} "
               f"-> {path}")


def _write(path: str, text: str, storage) -> None:
    """Local folder or object store (the reports sit next to the answers by default)."""
    from tasks.io import atomic

    atomic.write_bytes(path, text.encode("utf-8"), storage)
