"""Parse a dump's metadata (JSON, CSV or Parquet) into one clean Polars frame.

Hostile metadata never stops a run: a file that does not parse, rows that are not objects,
paths that escape the dump, duplicate rows and non-numeric scores each become a ``metadata`` or
``path`` reject with a readable reason, and every good row around them is kept.  A row's reject
is keyed by the image it names, ``metadata.json#image=<its relative path>`` (the Image Name when
it has no path), which stays put when rows are inserted above it (``#row=N`` only for a row
that names no image).
"""

from __future__ import annotations

import io
import json
import posixpath
import re
from dataclasses import dataclass, field
from urllib.parse import unquote

import polars as pl
from pyarrow import fs as pafs

from schemas.metadata import KEY_TO_COLUMN, METADATA_FILES, normalise_key
from schemas.tables import SCORE_COLUMNS
from tasks.ingest.discover import mtime_seconds

META_COLUMNS = ("rel_path", "image_name", "city", "lat", "lon", "place_id", "caption")
_DRIVE = re.compile(r"^[A-Za-z]:")


@dataclass
class Metadata:
    """Clean rows (``frame``) and the reasons for everything left out (``rejects``)."""

    frame: pl.DataFrame
    uri: str | None = None
    rejects: list[dict] = field(default_factory=list)


def safe_rel_path(raw: str) -> str:
    """Normalise a metadata path to ``a/b/c.jpg`` or raise ValueError if it could escape."""
    if not isinstance(raw, str) or not raw.strip():
        raise ValueError("empty path")
    for form in {raw, unquote(raw)}:
        p = form.strip().replace("\\", "/")
        if "\x00" in p:
            raise ValueError("path contains a NUL byte")
        if p.startswith("/") or _DRIVE.match(p) or "://" in p:
            raise ValueError(f"absolute path {raw!r} is not allowed (must be relative to the dump)")
        if ".." in p.split("/"):
            raise ValueError(f"path {raw!r} escapes the dump")
    rel = posixpath.normpath(raw.strip().replace("\\", "/"))
    while rel.startswith("./"):
        rel = rel[2:]
    if rel in ("", "."):
        raise ValueError(f"path {raw!r} names the dump folder itself, not a file")
    return rel


#: metadata files are parsed in memory by the driver: a hostile or runaway one must not take it
#: down (Place Pulse 2.0's 110k images need ~50 MB)
MAX_METADATA_BYTES = 1024**3


def metadata_stat(filesystem: pafs.FileSystem, root: str,
                  uri_prefix: str = "") -> tuple[str, int, float] | None:
    """(uri, size, mtime) of the metadata file ``load_metadata`` would read, without reading
    it: a run parses metadata only when this changed."""
    for name in METADATA_FILES:
        info = filesystem.get_file_info(f"{root}/{name}")
        if info.type == pafs.FileType.File:
            mtime = mtime_seconds(info.mtime_ns) if info.mtime_ns else 0.0
            return uri_prefix + f"{root}/{name}", info.size, mtime
    return None


def load_metadata(filesystem: pafs.FileSystem, root: str, uri_prefix: str = "") -> Metadata:
    """Find and parse the first metadata file present at the dump root (none is fine)."""
    for name in METADATA_FILES:
        path = f"{root}/{name}"
        info = filesystem.get_file_info(path)
        if info.type == pafs.FileType.File:
            uri = uri_prefix + path
            if info.size is not None and info.size > MAX_METADATA_BYTES:
                return Metadata(_empty_frame(), uri, [_reject(uri, "metadata", (
                    f"{name} is {info.size} bytes, over the {MAX_METADATA_BYTES}-byte limit "
                    "(it is parsed in memory): split the dump; images get no metadata"))])
            with filesystem.open_input_stream(path) as f:
                data = f.read()
            return parse_metadata(data, name.rsplit(".", 1)[1], uri)
    return Metadata(_empty_frame())


def parse_metadata(data: bytes, fmt: str, uri: str) -> Metadata:
    """Bytes of metadata.{json,csv,parquet} → Metadata; never raises for bad content."""
    rejects: list[dict] = []
    try:
        records = _READERS[fmt](data, uri, rejects)
    except Exception as e:  # noqa: BLE001 - a broken file is a reject, not a crash
        reason = f"cannot parse {uri.rsplit('/', 1)[-1]}: {type(e).__name__}: {e}"
        rejects.append(_reject(uri, "metadata", reason))
        return Metadata(_empty_frame(), uri, rejects)
    rows = [_clean_record(i, rec, uri, rejects) for i, rec in enumerate(records)]
    frame = _typed_frame([r for r in rows if r is not None], uri, rejects)
    return Metadata(_drop_duplicates(frame, uri, rejects), uri, rejects)


def _read_json(data: bytes, uri: str, rejects: list[dict]) -> list:
    text = data.decode("utf-8", errors="replace")
    if "\ufffd" in text and b"\xef\xbf\xbd" not in data:
        rejects.append(_reject(uri, "metadata", "not valid UTF-8; undecodable bytes replaced"))
    records = json.loads(text)
    if not isinstance(records, list):
        raise ValueError(f"expected a JSON list of objects, got a {type(records).__name__}")
    return records


def _read_csv(data: bytes, uri: str, rejects: list[dict]) -> list:
    return pl.read_csv(io.BytesIO(data), infer_schema=False, encoding="utf8-lossy").to_dicts()


def _read_parquet(data: bytes, uri: str, rejects: list[dict]) -> list:
    return pl.read_parquet(io.BytesIO(data)).to_dicts()


_READERS = {"json": _read_json, "csv": _read_csv, "parquet": _read_parquet}


def row_key(uri: str, i: int, image: str | None) -> str:
    """Where a metadata row's reject is recorded: by the image it names (its relative path, as
    normalised when it is safe), else by its index."""
    return f"{uri}#image={image}" if image else f"{uri}#row={i}"


def _clean_record(i: int, rec: object, uri: str, rejects: list[dict]) -> dict | None:
    """One raw record → strings per column, or None (with a reject) if unusable."""
    if not isinstance(rec, dict):
        rejects.append(_reject(row_key(uri, i, None), "metadata", f"row {i} is not an object"))
        return None
    out: dict[str, str | None] = dict.fromkeys((*META_COLUMNS, *SCORE_COLUMNS))
    for key, value in rec.items():
        column = KEY_TO_COLUMN.get(normalise_key(key))
        if column:
            out[column] = _as_text(value)
    name = out["image_name"]
    if out["rel_path"] is None and name is None:
        rejects.append(_reject(row_key(uri, i, None), "metadata", f"row {i} has neither "
                               "'Relative Path' nor 'Image Name'"))
        return None
    try:
        out["rel_path"] = safe_rel_path(out["rel_path"] or name)
    except ValueError as e:
        raw = out["rel_path"] or name
        rejects.append(_reject(row_key(uri, i, raw), "path", str(e), name or raw))
        return None
    out["image_name"] = name or posixpath.basename(out["rel_path"])
    out["row"] = i
    return out


def _as_text(value: object) -> str | None:
    if value is None:
        return None
    if isinstance(value, list):
        return "\n".join(str(v) for v in value if v is not None)
    return value if isinstance(value, str) else str(value)


def _typed_frame(rows: list[dict], uri: str, rejects: list[dict]) -> pl.DataFrame:
    """Strings → typed columns; a score that is not a finite number becomes null, with a note."""
    raw = pl.DataFrame(rows, schema={c: pl.String for c in (*META_COLUMNS, *SCORE_COLUMNS)}
                       | {"row": pl.Int64})
    numeric = {c: pl.Float32 for c in SCORE_COLUMNS} | {"lat": pl.Float64, "lon": pl.Float64}
    typed = raw.with_columns(
        pl.col(c).str.strip_chars().cast(t, strict=False).pipe(_finite_or_null).alias(c)
        for c, t in numeric.items()
    )
    for c in numeric:
        bad = raw.filter(
            pl.col(c).is_not_null() & (pl.col(c).str.strip_chars() != "")
            & typed[c].is_null()
        )
        for row in bad.select("row", "image_name", c, "rel_path").iter_rows():
            msg = f"{c} = {row[2][:40]!r} is not a finite number; stored as null"
            rejects.append(_reject(row_key(uri, row[0], row[3]), "metadata", msg, row[1]))
    return typed


def _finite_or_null(expr: pl.Expr) -> pl.Expr:
    return pl.when(expr.is_finite()).then(expr).otherwise(None)


def _drop_duplicates(frame: pl.DataFrame, uri: str, rejects: list[dict]) -> pl.DataFrame:
    dup = frame.filter(pl.col("rel_path").is_duplicated() & ~pl.col("rel_path").is_first_distinct())
    for row, rel in dup.select("row", "rel_path").iter_rows():
        msg = f"duplicate metadata row for {rel!r}; the first one is kept"
        rejects.append(_reject(row_key(uri, row, rel), "metadata", msg, posixpath.basename(rel)))
    return frame.unique("rel_path", keep="first", maintain_order=True)


def _empty_frame() -> pl.DataFrame:
    return _typed_frame([], "", [])


def _reject(uri: str, stage: str, error: str, file_name: str | None = None) -> dict:
    return {"source_uri": uri, "file_name": file_name or uri.rsplit("/", 1)[-1],
            "stage": stage, "error": error}
