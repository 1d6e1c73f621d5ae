"""Decide what a run must do: listing ⨝ metadata, compared with what the ledger holds.

Pure Polars over the listing, the metadata frame and the ``files`` ledger; reads no image
bytes.  A file is new work when its (source_uri, size, mtime) is not among the ledger's live
rows; a live ledger row of the dump whose file is not listed any more has *vanished*; an
unchanged file whose metadata values hash differently from the ledger's ``meta_hash`` has new
metadata.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import polars as pl
import pyarrow as pa

from schemas.metadata import FILE_NAME_PATTERN
from schemas.tables import LIVE_STATUSES, SCORE_COLUMNS
from tasks.ingest.metadata import Metadata

#: the images columns that come from metadata (or the file name)
META_VALUES = ("city", "lat", "lon", "place_id", "caption", *SCORE_COLUMNS)
PLAN_COLUMNS = (
    "source_uri", "rel_path", "file_name", "size", "mtime", "escape",
    *META_VALUES, "meta_hash", "old_image_id",
)
KEYS = ["source_uri", "size", "mtime"]
#: the ledger columns planning reads
LEDGER_COLUMNS = [*KEYS, "image_id", "status", "meta_hash"]
_NAME_REGEX = "(?i)" + FILE_NAME_PATTERN.pattern


@dataclass
class Plan:
    """``todo``: files to read (with metadata); ``listed``: every listed file with its metadata
    and ``meta_hash``; ``vanished``: the dump's live ledger rows whose file is gone (``kept``:
    a listed file the ledger knows holds the same bytes);
    ``meta_changed``: unchanged files whose metadata hash changed; ``rejects``: found without
    reading anything."""

    todo: pl.DataFrame
    seen: int
    unchanged: int
    rejects: list[dict] = field(default_factory=list)
    listed: pl.DataFrame | None = None
    vanished: pl.DataFrame | None = None
    meta_changed: pl.DataFrame | None = None
    known: int = 0


def with_metadata(listing: pl.DataFrame, meta: Metadata, uri_root: str) -> tuple[pl.DataFrame,
                                                                                  list[dict]]:
    """Attach metadata rows by relative path, else by a unique image name whose row's path is
    not in the dump (a moved file keeps its row), else parse the Place Pulse file name."""
    rows = meta.frame.drop("row")
    joined = listing.join(rows.drop("image_name"), on="rel_path", how="left")
    orphans = rows.join(listing.select("rel_path"), on="rel_path", how="anti")
    by_name = (listing.join(rows.select("rel_path"), on="rel_path", how="anti")
               .select("rel_path", "file_name")
               .join(orphans.filter(pl.col("image_name").is_unique()).drop("rel_path"),
                     left_on="file_name", right_on="image_name", how="inner"))
    joined = joined.update(by_name.drop("file_name"), on="rel_path")
    parsed = listing.select(
        pl.col("file_name").str.extract_groups(_NAME_REGEX).alias("p")
    ).unnest("p")
    joined = joined.with_columns(
        pl.coalesce(pl.col("city"), parsed["city"]).alias("city"),
        pl.coalesce(pl.col("lat"), parsed["lat"].cast(pl.Float64, strict=False)).alias("lat"),
        pl.coalesce(pl.col("lon"), parsed["lon"].cast(pl.Float64, strict=False)).alias("lon"),
        pl.coalesce(pl.col("place_id"), parsed["place_id"]).alias("place_id"),
    )
    absent = orphans.filter(~pl.col("image_name").is_in(by_name["file_name"].implode()))
    return with_meta_hash(joined), _missing(absent, meta.uri, uri_root)


def with_meta_hash(frame: pl.DataFrame) -> pl.DataFrame:
    """``meta_hash``: sha256 of a file's metadata values as the images row would hold them
    (so a reformatted metadata file with the same values changes nothing)."""
    encoded = frame.select(pl.struct(list(META_VALUES)).struct.json_encode())
    digests = [hashlib.sha256(s.encode()).hexdigest() for s in encoded.to_series().to_list()]
    return frame.with_columns(pl.Series("meta_hash", digests, pl.String))


def _missing(absent: pl.DataFrame, meta_uri: str | None, uri_root: str) -> list[dict]:
    where = (meta_uri or "metadata").rsplit("/", 1)[-1]
    return [
        {"source_uri": f"{uri_root}/{rel}", "file_name": name, "stage": "missing",
         "error": f"listed in {where} but not found in the dump"}
        for rel, name in absent.select("rel_path", "image_name").iter_rows()
    ]


def live_rows(ledger: pl.DataFrame | pl.LazyFrame, uri_root: str | None = None):
    """Ledger rows of files that exist (not ``deleted``), of one dump when ``uri_root`` is set."""
    rows = ledger.filter(pl.col("status") != "deleted")
    return rows.filter(in_dump(uri_root)) if uri_root is not None else rows


def in_dump(uri_root: str) -> pl.Expr:
    return pl.col("source_uri").str.starts_with(uri_root + "/")


def plan_ingest(listing: pa.Table, meta: Metadata, ledger: pl.DataFrame | pl.LazyFrame | None,
                uri_root: str) -> Plan:
    """Anti-join the listing against the ledger's live rows; changed files carry their old
    image_id; the dump's live rows not listed any more are ``vanished``."""
    files = pl.from_arrow(listing)
    joined, rejects = with_metadata(files, meta, uri_root)
    rejects = list(meta.rejects) + rejects
    if ledger is None:
        todo = joined.with_columns(pl.lit(None, pl.String).alias("old_image_id"))
        vanished = meta_changed = None
        mine = 0
    else:
        known = live_rows(ledger.lazy()).collect()
        todo = joined.join(known, on=KEYS, how="anti")
        todo = todo.join(known.select("source_uri", pl.col("image_id").alias("old_image_id")),
                         on="source_uri", how="left")
        mine = live_rows(known, uri_root)
        still = known.join(files.select("source_uri"), on="source_uri", how="semi")["image_id"]
        vanished = mine.join(files.select("source_uri"), on="source_uri", how="anti").with_columns(
            kept=pl.col("image_id").is_in(still.drop_nulls().implode()).fill_null(False))
        meta_changed = _meta_changed(joined, known)
        mine = mine.height
    todo = todo.select(PLAN_COLUMNS)
    return Plan(todo, files.height, files.height - todo.height, rejects, joined, vanished,
                meta_changed, mine)


def _meta_changed(joined: pl.DataFrame, known: pl.DataFrame) -> pl.DataFrame:
    """Unchanged files holding an image whose metadata values no longer hash as recorded."""
    held = known.filter(pl.col("status").is_in(LIVE_STATUSES))
    return (joined.select(*KEYS, pl.col("meta_hash").alias("new_hash"))
            .join(held.select(*KEYS, "image_id", "meta_hash"), on=KEYS, how="inner")
            .filter(pl.col("meta_hash").ne_missing(pl.col("new_hash")))
            .select("source_uri", "image_id", pl.col("new_hash").alias("meta_hash")))
