"""Operations commands: ``mmrag serve`` (schedules without a work pool) and ``mmrag status``."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from mmrag.cli.app import app, fatal, overrides, settings_from


@app.command("serve")
def serve(
    ctx: typer.Context,
    source: Annotated[str | None, typer.Option(
        "--source", envvar="MMRAG_DUMP_ROOT", help="dump root to ingest")] = None,
    queries: Annotated[str | None, typer.Option(
        "--queries", envvar="MMRAG_QUERIES", help="queries file to answer")] = None,
    interval: Annotated[int, typer.Option(min=60, help="seconds between ingests")] = 3600,
    cron: Annotated[str, typer.Option(help="when to answer the queries (cron, UTC)")]
    = "0 6 * * *",
) -> None:
    """Run ingest every INTERVAL and the queries on CRON (and after each ingest) until stopped.

    Needs a Prefect server: `prefect server start`, then PREFECT_API_URL=http://127.0.0.1:4200/api.
    Flow runs execute in subprocesses of this command, with its environment (MMRAG_*).
    """
    _require_api_url()
    if not source and not queries:
        fatal("nothing to serve: give --source (ingest) and/or --queries (query)")
    settings_from(ctx)  # refuse invalid MMRAG_* / global options now, not in the first run
    from prefect import serve as prefect_serve

    deployments = _deployments(overrides(ctx), source, queries, interval, cron)
    _refuse_pool_deployments([d.full_name for d in deployments])
    prefect_serve(*deployments)


def _require_api_url() -> None:
    """Schedules and triggers need a real server; the ephemeral one cannot run them."""
    from prefect.settings import get_current_settings

    if not get_current_settings().api.url:
        fatal("mmrag serve needs a Prefect server: run `prefect server start` and set "
                    "PREFECT_API_URL=http://127.0.0.1:4200/api")


def _refuse_pool_deployments(names: list[str]) -> None:
    """A served deployment cannot take over a work-pool one of the same name (measured: its
    runs then crash loading the flow code), so refuse; also fail fast on an unreachable server."""
    from prefect import get_client
    from prefect.exceptions import ObjectNotFound

    try:
        with get_client(sync_client=True) as client:
            for name in names:
                try:
                    pool = client.read_deployment_by_name(name).work_pool_name
                except ObjectNotFound:
                    continue
                if pool:
                    fatal(f"deployment {name} runs on work pool '{pool}' (prefect.yaml): "
                                f"start a worker for it, or `prefect deployment delete {name}`")
    except (typer.Exit, SystemExit):
        raise
    except Exception as e:  # noqa: BLE001 - connection refused, bad URL: one line
        fatal(f"cannot reach the Prefect server: {e}")


def _deployments(given: dict, source: str | None, queries: str | None, interval: int,
                 cron: str) -> list:
    """Same names, parameters and trigger as deployments/prefect.yaml."""
    from deployments.triggers import ingest_completed

    settings = {"settings": given} if given else {}
    out = []
    if source:
        from flows.ingest import ingest_flow

        out.append(ingest_flow.to_deployment(
            name="ingest", interval=interval, parameters={"source": source} | settings,
            tags=["mmrag"], description="mmrag serve: incremental ingest"))
    if queries:
        from flows.query import query_flow

        out.append(query_flow.to_deployment(
            name="query", cron=cron, parameters={"queries": queries} | settings,
            triggers=[ingest_completed()], tags=["mmrag"],
            description="mmrag serve: answer the queries (also after each ingest)"))
    return out


@app.command("status")
def status(
    ctx: typer.Context,
    out: Annotated[str | None, typer.Option(help="answers root [MMRAG_OUT]")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
    runs: Annotated[int, typer.Option(min=1, help="how many recent runs to list")] = 10,
) -> None:
    """Tables, row counts, versions, indexes, rejects, dumps (live/deleted files, last run's
    changes), recent runs and answer partitions."""
    from flows import config
    from tasks.io.status import answers_status, db_status

    settings = settings_from(ctx)
    try:
        storage = config.storage(settings)
        report = {"db": db_status(settings.db, runs, storage),
                  "answers": answers_status(out or settings.out, storage)}
    except Exception as e:  # noqa: BLE001 - unreachable store, bad URI: one line, exit 2
        fatal(f"cannot read status: {e}")
    if as_json:
        typer.echo(json.dumps(report, indent=2, default=str))
    else:
        _render(report)


def _render(report: dict) -> None:
    from rich.console import Console

    console = Console(width=None if Console().is_terminal else 140, highlight=False)
    db = report["db"]
    if not db["exists"]:
        console.print(f"no database at {db['uri']} yet: run `mmrag ingest SOURCE` first")
    elif not db["tables"]:
        console.print(f"database {db['uri']} has no tables yet: run `mmrag ingest SOURCE` first")
    else:
        console.print(f"database {db['uri']}")
        for table in _tables(db):
            console.print(table)
    answers = report["answers"]
    if answers["partitions"]:
        console.print(_grid(f"answers under {answers['out']}",
                            ["run_date", "files", "rows", "runs"],
                            [[p["run_date"], p["files"], p["rows"], ", ".join(p["runs"])]
                             for p in answers["partitions"]]))
    else:
        console.print(f"no answers under {answers['out']} yet")


def _tables(db: dict) -> list:
    tables = [_grid("tables", ["table", "rows", "version", "indices"],
                    [[t["name"], t.get("rows", t.get("error")), t.get("version", ""),
                      ", ".join(f"{i['name']} ({i['type']})" for i in t["indices"])]
                     for t in db["tables"]])]
    indices = [[t["name"], i["name"], i["type"], ",".join(i["columns"]), i["indexed_rows"],
                i["unindexed_rows"]] for t in db["tables"] for i in t["indices"]]
    if indices:
        tables.append(_grid("indices", ["table", "index", "type", "columns", "indexed",
                                        "unindexed"], indices))
    if db["rejects"]:
        tables.append(_grid("rejects by stage", ["table", "stage", "rows"],
                            [[r["table"], r["stage"], r["rows"]] for r in db["rejects"]]))
    if db.get("sources"):
        tables.append(_grid("sources", ["table set", "source", "live", "deleted", "last run",
                                        "metadata updated", "files deleted", "images deleted",
                                        "moved"],
                            [[s["table_set"] or "-", s["source"], s["live"], s["deleted"],
                              s["last_run_id"] or "-", s["metadata_updated"],
                              s["files_deleted"], s["images_deleted"], s["moved"]]
                             for s in db["sources"]]))
    if db["runs"]:
        tables.append(_grid("last runs", ["run_id", "table set", "images", "files", "rejects",
                                          "last write (UTC)"],
                            [[r["run_id"], r["table_set"] or "-", r["images"], r["files"],
                              r["rejects"], r["last_at"] or "-"] for r in db["runs"]]))
    return tables


_NUMERIC = {"rows", "files", "version", "images", "rejects", "indexed", "unindexed", "live",
            "deleted", "metadata updated", "files deleted", "images deleted", "moved"}


def _grid(title: str, columns: list[str], rows: list[list]):
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for c in columns:
        table.add_column(c, justify="right" if c in _NUMERIC else "left")
    for row in rows:
        table.add_row(*["" if v is None else str(v) for v in row])
    return table
