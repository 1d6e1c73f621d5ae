"""The one atomic writer: every file mmrag writes appears complete or not at all.

Locally: a hidden temp sibling (``.``-prefixed, ``.tmp``-suffixed, so Hive/DuckDB/Polars/
pyarrow globs skip it), fsynced, renamed over the final name, then the folder fsynced; a
killed writer's temp files are swept by the next write of the same name once an hour old.
On object storage there is no rename, but one upload of the complete bytes to the final key
is visible only once complete: the bytes are produced first, so a failing producer never
reaches the store.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from tasks.io.objstore import StorageConfig, filesystem, is_local

STALE_TMP_SECONDS = 3600


def write_bytes(final: str | Path, data: bytes | memoryview,
                storage: StorageConfig | None = None) -> None:
    """Write ``data`` to ``final`` (a local path or an object-store URI) atomically."""
    final = str(final)
    if is_local(final):
        with atomic_path(final.removeprefix("file://")) as tmp:
            tmp.write_bytes(data)
        return
    fs_, path = filesystem(final, storage)
    with fs_.open_output_stream(path) as out:
        out.write(data)


def write_parquet(table, final: str | Path, storage: StorageConfig | None = None,
                  **options) -> None:
    """A Parquet file (an Arrow table or a Polars frame), serialised first, then written
    atomically like any other file: a failing writer never reaches ``final``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not isinstance(table, pa.Table):
        table = table.to_arrow()
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, **options)
    write_bytes(final, memoryview(sink.getvalue()), storage)


@contextlib.contextmanager
def atomic_path(final: str | Path, *, folder: bool = False,
                keep_existing: bool = False) -> Iterator[Path]:
    """Yield a hidden temp path beside local ``final`` to write (a file, or with
    ``folder=True`` a folder); on success it replaces ``final``, on failure it is removed.

    ``keep_existing``: if another writer created ``final`` first, keep theirs (for caches
    that two processes may build at once)."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.{uuid.uuid4().hex}.tmp")
    if folder:
        tmp.mkdir()
    try:
        yield tmp
        if not folder:
            _fsync(tmp)
        _replace(tmp, final, keep_existing)
    finally:
        _remove(tmp)
    with contextlib.suppress(OSError):  # makes the rename durable; not possible everywhere
        _fsync(final.parent)
    sweep_stale(final.parent, final.name)


def _replace(tmp: Path, final: Path, keep_existing: bool) -> None:
    try:
        os.replace(tmp, final)
    except OSError:  # a folder cannot replace a non-empty folder
        if not (keep_existing and final.exists()):
            raise


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()


def _fsync(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sweep_stale(directory: str | Path, name: str, now: float | None = None) -> None:
    """Remove temp files a killed writer of ``name`` left behind (readers already skip them).

    Only those older than an hour: a concurrent writer may still own a fresh one."""
    cutoff = (now or time.time()) - STALE_TMP_SECONDS
    for tmp in Path(directory).glob(f".{glob.escape(name)}.*.tmp"):
        with contextlib.suppress(OSError):
            if tmp.stat().st_mtime < cutoff:
                _remove(tmp)
