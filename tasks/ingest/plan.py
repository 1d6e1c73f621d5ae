"""Decide what a run must read: listing ⨝ metadata, minus what the ledger already holds.

Pure Polars over the listing, the metadata frame and the ``files`` ledger; reads no image
bytes.  A file is new work when its (source_uri, size, mtime) is not in the ledger.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import polars as pl
import pyarrow as pa

from schemas.metadata import FILE_NAME_PATTERN
from schemas.tables import SCORE_COLUMNS
from tasks.ingest.metadata import Metadata

PLAN_COLUMNS = (
    "source_uri", "rel_path", "file_name", "size", "mtime", "escape",
    "city", "lat", "lon", "place_id", "caption", *SCORE_COLUMNS, "old_image_id",
)
_NAME_REGEX = "(?i)" + FILE_NAME_PATTERN.pattern


@dataclass
class Plan:
    """``todo``: files to read (with metadata); ``rejects``: found without reading anything."""

    todo: pl.DataFrame
    seen: int
    unchanged: int
    rejects: list[dict] = field(default_factory=list)


def with_metadata(listing: pl.DataFrame, meta: Metadata, uri_root: str) -> tuple[pl.DataFrame,
                                                                                  list[dict]]:
    """Attach metadata rows by relative path; fall back to the Place Pulse file name."""
    rows = meta.frame.drop("row")
    joined = listing.join(rows.drop("image_name"), on="rel_path", how="left")
    parsed = listing.select(
        pl.col("file_name").str.extract_groups(_NAME_REGEX).alias("p")
    ).unnest("p")
    joined = joined.with_columns(
        pl.coalesce(pl.col("city"), parsed["city"]).alias("city"),
        pl.coalesce(pl.col("lat"), parsed["lat"].cast(pl.Float64, strict=False)).alias("lat"),
        pl.coalesce(pl.col("lon"), parsed["lon"].cast(pl.Float64, strict=False)).alias("lon"),
        pl.coalesce(pl.col("place_id"), parsed["place_id"]).alias("place_id"),
    )
    return joined, _missing(listing, rows, meta.uri, uri_root)


def _missing(listing: pl.DataFrame, rows: pl.DataFrame, meta_uri: str | None,
             uri_root: str) -> list[dict]:
    absent = rows.join(listing.select("rel_path"), on="rel_path", how="anti")
    where = (meta_uri or "metadata").rsplit("/", 1)[-1]
    return [
        {"source_uri": f"{uri_root}/{rel}", "file_name": name, "stage": "missing",
         "error": f"listed in {where} but not found in the dump"}
        for rel, name in absent.select("rel_path", "image_name").iter_rows()
    ]


def plan_ingest(listing: pa.Table, meta: Metadata, ledger: pl.LazyFrame | None,
                uri_root: str) -> Plan:
    """Anti-join the listing against the ledger; changed files carry their old image_id."""
    files = pl.from_arrow(listing)
    joined, rejects = with_metadata(files, meta, uri_root)
    rejects = list(meta.rejects) + rejects
    if ledger is None:
        todo = joined.with_columns(pl.lit(None, pl.String).alias("old_image_id"))
    else:
        known = ledger.select("source_uri", "size", "mtime", "image_id").collect()
        todo = joined.join(known, on=["source_uri", "size", "mtime"], how="anti")
        todo = todo.join(known.select("source_uri", pl.col("image_id").alias("old_image_id")),
                         on="source_uri", how="left")
    todo = todo.select(PLAN_COLUMNS)
    return Plan(todo, files.height, files.height - todo.height, rejects)
