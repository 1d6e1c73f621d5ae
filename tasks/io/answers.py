"""Write and read the answers dataset: ``{out}/answers/run_date=YYYY-MM-DD/{run_id}.parquet``.

Analysts scan the whole directory with DuckDB or Polars while runs are writing, so a file must
appear complete or not at all: ``tasks.io.atomic`` writes it (hidden temp + fsync + rename
locally, one upload on object storage).  A re-run of the same ``run_id`` therefore replaces the
previous file in one step, and a crash leaves the previous file (or nothing) behind.

``run_id`` and ``run_date`` become path components, so both are validated: no separators, no
``..``, no hidden names.
"""

from __future__ import annotations

import os
import re
import uuid
from datetime import date
from pathlib import Path

import polars as pl
import pyarrow as pa
from pyarrow import fs as pafs

from schemas.answers import ANSWER_SCHEMA, ANSWERS_DIR, RETRIEVED_TYPE
from tasks.io import atomic
from tasks.io.objstore import StorageConfig, filesystem, is_local, storage_options

# ~5–10 KB per row (prompt + retrieved hits): 10k rows ≈ 50–100 MB uncompressed per row group,
# the usual sweet spot for scan engines; most runs fit in one group.
ROW_GROUP_ROWS = 10_000
COMPRESSION = "zstd"
_RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_RUN_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")
_RETRIEVED_FIELDS = [f.name for f in RETRIEVED_TYPE]


class OutputError(OSError):
    """The answers file could not be written (disk full, read-only or missing location); any
    previous file of the run is untouched."""


def validate_run_id(run_id: str) -> str:
    """Letters, digits, ``.``, ``_``, ``-``; starts alphanumeric (never hidden); no ``..``."""
    if not isinstance(run_id, str) or not _RUN_ID.fullmatch(run_id) or ".." in run_id:
        raise ValueError(
            f"invalid run_id {run_id!r}: use 1-128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit, without '..'"
        )
    return run_id


def validate_run_date(run_date: str) -> str:
    """A real calendar date in ``YYYY-MM-DD`` form (the Hive partition value)."""
    try:
        if isinstance(run_date, str) and _RUN_DATE.fullmatch(run_date):
            date.fromisoformat(run_date)
            return run_date
    except ValueError:
        pass
    raise ValueError(f"invalid run_date {run_date!r}: expected a date as YYYY-MM-DD")


def dataset_root(out_root: str) -> str:
    """The dataset root without a trailing slash: a local path, or a URI with a bucket."""
    root = str(out_root)
    if is_local(root):
        return root.removeprefix("file://").rstrip("/") or "/"
    scheme, rest = root.split("://", 1)
    if not rest.strip("/"):
        raise ValueError(f"answers output {out_root!r}: expected {scheme}://bucket[/prefix]")
    return f"{scheme}://{rest.rstrip('/')}"


def answers_path(out_root: str, run_date: str, run_id: str) -> str:
    """Final location of one run's file (validates both path components)."""
    root = dataset_root(out_root)
    run_date, run_id = validate_run_date(run_date), validate_run_id(run_id)
    return f"{root}/{ANSWERS_DIR}/run_date={run_date}/{run_id}.parquet"


def _normalise(row: dict) -> dict:
    """Reject unknown keys (a typo would silently become a null column); project the hits."""
    unknown = set(row) - set(ANSWER_SCHEMA.names)
    if unknown:
        raise ValueError(f"answer row has keys outside ANSWER_SCHEMA: {sorted(unknown)}")
    hits = row.get("retrieved")
    if hits is None:
        return row
    # hits may carry extra search columns (vector, _distance …): keep only the contract's fields
    return {**row, "retrieved": [{k: h.get(k) for k in _RETRIEVED_FIELDS} for h in hits]}


def answers_table(rows: list[dict]) -> pa.Table:
    """Rows → a table with exactly ``ANSWER_SCHEMA`` (missing keys null, metadata kept)."""
    table = pa.Table.from_pylist([_normalise(r) for r in rows], schema=ANSWER_SCHEMA)
    return table.replace_schema_metadata(ANSWER_SCHEMA.metadata)


def write_answers(rows: list[dict], out_root: str, run_date: str, run_id: str,
                  storage: StorageConfig | None = None) -> str:
    """Write one run's answers (replacing an earlier file of the same run); returns its path.

    ``storage`` reaches an s3:// ``out_root`` (None = the SDK's defaults)."""
    final = answers_path(out_root, run_date, run_id)
    try:
        publish(answers_table(rows), final, storage)
    except OSError as e:
        raise OutputError(f"cannot write answers to {final}: {e}") from e
    return final


def check_writable(out_root: str, run_date: str | None = None) -> None:
    """Fail before any retrieval or generation, not after it, when answers cannot be written.

    Local roots only: creates the partition folder and writes and removes a hidden probe file
    there (object stores are checked by the final upload)."""
    root = dataset_root(out_root)
    if not is_local(root):
        return
    folder = Path(root.removeprefix("file://")) / ANSWERS_DIR
    if run_date:
        folder = folder / f"run_date={validate_run_date(run_date)}"
    probe = folder / f".probe-{uuid.uuid4().hex}.tmp"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise OutputError(f"cannot write answers under {folder}: {e}") from e


def publish(table: pa.Table, final: str, storage: StorageConfig | None = None) -> None:
    """Make ``final`` appear complete or not at all, locally or on object storage (shared by
    every Parquet dataset mmrag writes: answers, metrics).  Serialised first, so a writer
    error never reaches the destination."""
    atomic.write_parquet(table, final, storage, compression=COMPRESSION,
                         row_group_size=ROW_GROUP_ROWS)


def _polars_schema() -> pl.Schema:
    return pl.from_arrow(ANSWER_SCHEMA.empty_table()).schema


def dataset_files(root: str, storage: StorageConfig | None = None) -> list[str]:
    """The visible ``run_date=*/*.parquet`` files under ``root`` (temp/hidden ones skipped)."""
    if is_local(root):
        files = Path(root.removeprefix("file://")).glob("run_date=*/*.parquet")
        return sorted(os.path.abspath(f) for f in files if not f.name.startswith((".", "_")))
    fs_, path = filesystem(root, storage)
    infos = fs_.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    return sorted(i.path for i in infos if i.type == pafs.FileType.File
                  and i.base_name.endswith(".parquet") and not i.base_name.startswith((".", "_"))
                  and i.path.rsplit("/", 2)[-2].startswith("run_date="))


def has_dataset_files(root: str, storage: StorageConfig | None) -> bool:
    """Any file to scan (a glob over none fails in Polars)."""
    return bool(dataset_files(root, storage))


def read_answers(out_root: str, storage: StorageConfig | None = None) -> pl.LazyFrame:
    """All runs as one lazy frame, ``run_date`` (a Date) from the partition path.

    The current schema is imposed, so files of an older schema version (fewer columns) read
    with nulls; hidden/temporary files are ignored.  No files yet → an empty frame.
    """
    root = f"{dataset_root(out_root)}/{ANSWERS_DIR}"
    hive = {"run_date": pl.Date}
    if not has_dataset_files(root, storage):
        return pl.LazyFrame(schema={**_polars_schema(), **hive})
    return pl.scan_parquet(
        f"{root}/**/*.parquet", hive_partitioning=True, hive_schema=hive,
        schema=_polars_schema(), missing_columns="insert", extra_columns="ignore",
        hidden_file_prefix=[".", "_"], storage_options=storage_options(root, storage),
    )
