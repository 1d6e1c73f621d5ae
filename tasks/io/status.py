"""What is in the database and the answers dataset, without changing either.

``mmrag status`` answers the operator's questions after a scheduled run: did rows land, which
runs wrote them, are the indexes current, what was rejected and why, how many files of each dump
are live or deleted and what the dump's last run updated or deleted, which answer partitions
exist.  Everything here only reads: a missing local database is reported, never created
(``lancedb.connect`` would create the folder).
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from pathlib import Path

import polars as pl

_KIND = re.compile(r"^(images|files|rejects|sources)(__.*)?$")
_RUN_KINDS = ("images", "files", "rejects")
_LAST_RUN = ("metadata_updated", "files_deleted", "images_deleted", "moved")
_TIME = {"images": "ingested_at", "rejects": "at"}
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def db_status(uri: str, last_runs: int = 10, storage=None) -> dict:
    """Tables, rows, versions, indexes, rejects by stage and the latest runs of ``uri``.

    ``storage``: a ``tasks.io.objstore.StorageConfig`` for S3-compatible stores (None = env)."""
    from tasks.io import store
    from tasks.io.objstore import is_local

    if is_local(uri) and not Path(uri.removeprefix("file://")).exists():
        return {"uri": uri, "exists": False, "tables": [], "rejects": [], "sources": [],
                "runs": []}
    db = store.connect(uri, storage)
    tables = {name: db.open_table(name) for name in _table_names(db)}
    return {
        "uri": uri, "exists": True,
        "tables": [_table(name, t) for name, t in tables.items()],
        "rejects": _reject_stages(tables),
        "sources": _sources(tables),
        "runs": _runs(tables)[:last_runs],
    }


def _table_names(db) -> list[str]:
    names, token = [], None
    while True:
        page = db.list_tables(page_token=token)
        names += page.tables
        token = page.page_token
        if not token:
            return sorted(names)


def _table(name: str, tbl) -> dict:
    try:
        indices = [{"name": i.name, "type": i.index_type, "columns": list(i.columns),
                    "indexed_rows": i.num_indexed_rows, "unindexed_rows": i.num_unindexed_rows}
                   for i in tbl.list_indices()]
        return {"name": name, "rows": tbl.count_rows(), "version": tbl.version,
                "indices": indices}
    except Exception as e:  # noqa: BLE001 - one broken table must not hide the others
        return {"name": name, "error": str(e), "indices": []}


def _reject_stages(tables: dict) -> list[dict]:
    out = []
    for name, tbl in tables.items():
        if _kind(name) != "rejects" or not tbl.count_rows():
            continue
        counts = tbl.to_polars().group_by("stage").len().sort("stage").collect()
        out += [{"table": name, "stage": s, "rows": n} for s, n in counts.iter_rows()]
    return out


def _sources(tables: dict) -> list[dict]:
    """Per (table set, dump): live and deleted files in the ledger (a file's dump is its
    source_uri minus its rel_path), and what the dump's last run changed (``sources`` table)."""
    out = []
    for name, tbl in tables.items():
        if _kind(name) != "files" or not tbl.count_rows():
            continue
        suffix = name.removeprefix("files")
        frame = tbl.to_polars().select("source_uri", "rel_path", "status").collect()
        tail = pl.col("rel_path").str.len_chars() + 1
        counts = (frame.with_columns(source=pl.col("source_uri").str.head(
                      pl.col("source_uri").str.len_chars() - tail),
                      deleted=pl.col("status") == "deleted")
                  .group_by("source").agg(live=(~pl.col("deleted")).sum(),
                                          deleted=pl.col("deleted").sum())
                  .sort("source"))
        last = _last_runs(tables.get("sources" + suffix))
        for row in counts.iter_rows(named=True):
            run = last.get(row["source"], {})
            out.append({"table_set": suffix.removeprefix("__"), **row,
                        "last_run_id": run.get("run_id"),
                        "last_at": run["at"].isoformat() if run.get("at") else None}
                       | {k: run.get(k) for k in _LAST_RUN})
    return out


def _last_runs(tbl) -> dict[str, dict]:
    if tbl is None or not tbl.count_rows():
        return {}
    rows = tbl.to_polars().collect().to_dicts()
    return {r["source"]: r | {"at": _utc(r.get("at"))} for r in rows}


def _runs(tables: dict) -> list[dict]:
    """One row per (run_id, table set): rows each table holds from it, and when it last wrote."""
    runs: dict[tuple[str, str], dict] = {}
    for name, tbl in tables.items():
        kind = _kind(name)
        if kind not in _RUN_KINDS or not tbl.count_rows():
            continue
        aggs = [pl.len().alias("rows")]
        if kind in _TIME:
            aggs.append(pl.col(_TIME[kind]).max().alias("last_at"))
        for r in tbl.to_polars().group_by("run_id").agg(*aggs).collect().iter_rows(named=True):
            key = (r["run_id"], _suffix(name))
            row = runs.setdefault(key, {"run_id": key[0], "table_set": key[1], "images": 0,
                                        "files": 0, "rejects": 0, "last_at": None})
            row[kind] = r["rows"]
            row["last_at"] = max(filter(None, [row["last_at"], _utc(r.get("last_at"))]),
                                 default=None)
    ordered = sorted(runs.values(), key=lambda r: r["last_at"] or _EPOCH, reverse=True)
    return [r | {"last_at": r["last_at"].isoformat() if r["last_at"] else None} for r in ordered]


def _utc(at: datetime | None) -> datetime | None:
    return at.replace(tzinfo=UTC) if at is not None and at.tzinfo is None else at


def _kind(name: str) -> str | None:
    m = _KIND.match(name)
    return m.group(1) if m else None


def _suffix(name: str) -> str:
    m = _KIND.match(name)
    return (m.group(2) or "").removeprefix("__") if m else ""


def answers_status(out: str, storage=None) -> dict:
    """Partitions of ``{out}/answers``: run date, files, rows (from Parquet footers only)."""
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq

    from schemas.answers import ANSWERS_DIR
    from tasks.io.objstore import filesystem, is_local

    if is_local(out):
        out = str(Path(out.removeprefix("file://")).resolve())
    fs, root = filesystem(out.rstrip("/") + "/" + ANSWERS_DIR, storage)
    root = root.rstrip("/")
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    parts: dict[str, dict] = {}
    for info in sorted(infos, key=lambda i: i.path):
        rel = info.path[len(root):].strip("/").split("/")
        if (info.type != pafs.FileType.File or len(rel) != 2 or not rel[0].startswith("run_date=")
                or rel[1].startswith(".") or not rel[1].endswith(".parquet")):
            continue
        p = parts.setdefault(rel[0].removeprefix("run_date="), {"files": 0, "rows": 0, "runs": []})
        with fs.open_input_file(info.path) as f:
            p["rows"] += pq.ParquetFile(f).metadata.num_rows
        p["files"] += 1
        p["runs"].append(rel[1].removesuffix(".parquet"))
    return {"out": out, "partitions": [{"run_date": d} | v for d, v in sorted(parts.items())]}
