"""List a dump: every image file under SOURCE with its size and mtime (no bytes read).

pyarrow's filesystems give one listing code path for local folders and object stores.  Local
files whose real path leaves the dump (symlinks) are flagged here so they are never read.
"""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa
from pyarrow import fs as pafs

from tasks.storage import StorageConfig, filesystem, is_local

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
LISTING_SCHEMA = pa.schema(
    [
        ("source_uri", pa.string()),
        ("rel_path", pa.string()),
        ("file_name", pa.string()),
        ("size", pa.int64()),
        ("mtime", pa.float64()),
        ("escape", pa.string()),
    ]
)


class SourceError(Exception):
    """A fatal problem with SOURCE itself (missing, not a folder, unreachable)."""


def open_source(source: str, storage: StorageConfig | None = None,
                ) -> tuple[pafs.FileSystem, str, bool]:
    """(filesystem, root path inside it, is_local); raises SourceError with a one-line reason.

    ``storage`` None = endpoint/region from the ``MMRAG_S3_*`` environment."""
    if is_local(source):
        root = os.path.realpath(source.removeprefix("file://"))
        if not os.path.exists(root):
            raise SourceError(f"SOURCE does not exist: {source}")
        if not os.path.isdir(root):
            raise SourceError(f"SOURCE is not a folder: {source}")
        return pafs.LocalFileSystem(), root, True
    try:
        fs_, root = filesystem(source, storage)
        root = root.rstrip("/")
        info = fs_.get_file_info(root)
    except Exception as e:  # noqa: BLE001 - any backend error is a one-line fatal error
        raise SourceError(f"cannot open SOURCE {source}: {e}") from e
    if info.type != pafs.FileType.Directory:
        raise SourceError(f"SOURCE is not a folder/prefix: {source}")
    return fs_, root, False


def list_dump(source: str, storage: StorageConfig | None = None) -> pa.Table:
    """One row per image file (by suffix, any case); ``escape`` set for files outside the dump."""
    fs_, root, local = open_source(source, storage)
    scheme = "" if local else source.split("://", 1)[0] + "://"
    infos = fs_.get_file_info(pafs.FileSelector(root, recursive=True))
    rows = {name: [] for name in LISTING_SCHEMA.names}
    for info in infos:
        if info.type != pafs.FileType.File or not info.base_name.lower().endswith(IMAGE_SUFFIXES):
            continue
        rel = info.path[len(root) :].lstrip("/")
        rows["source_uri"].append(scheme + info.path)
        rows["rel_path"].append(rel)
        rows["file_name"].append(info.base_name)
        rows["size"].append(info.size)
        rows["mtime"].append(info.mtime.timestamp() if info.mtime else 0.0)
        rows["escape"].append(_escape_reason(info.path, root) if local else None)
    return pa.table(rows, schema=LISTING_SCHEMA)


def _escape_reason(path: str, root: str) -> str | None:
    real = os.path.realpath(path)
    if real == root or real.startswith(root + os.sep):
        return None
    return f"symlink resolves outside the dump (to {Path(real)})"


def confined(root: str, rel_path: str) -> str | None:
    """The absolute local path for ``rel_path`` if its real location stays inside ``root``."""
    candidate = os.path.realpath(os.path.join(root, rel_path))
    if candidate == root or not candidate.startswith(root + os.sep):
        return None
    return candidate
