"""Bring ``images`` and the ledger's statuses in line with which live files hold which bytes.

Everything here is derived from the ``files`` ledger, so running it twice changes nothing the
second time, and a run killed halfway is finished by the next one.  For each image touched:

- it comes from the live file with the smallest ``source_uri`` (``ingested``; the others are
  ``duplicate``), whatever order the files arrived in;
- its metadata is that file's, when the file is in the dump being ingested (``meta``);
- with no live file left its row is deleted (older table versions keep it).

The image vector is never rewritten: a moved file or a new introducer keeps the stored
embedding.  A row whose caption changed loses its caption vector (``caption_vector`` null): the
caption refresh (``tasks.ingest.captions``) embeds the new caption.
"""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl
import pyarrow as pa

from schemas.tables import LIVE_STATUSES
from tasks.ingest.plan import META_VALUES
from tasks.io import store
from tasks.io.captions import forget_captions

IDENTITY = ("source_uri", "rel_path", "file_name")


@dataclass
class Reconciled:
    images_deleted: int = 0
    metadata_updated: int = 0
    repointed: int = 0


def reconcile(tables: store.Tables, image_ids, meta: pl.DataFrame | None = None,
              hashes: pl.DataFrame | None = None) -> Reconciled:
    """Fix the images rows of ``image_ids`` and their files' statuses; then record ``hashes``
    (source_uri → meta_hash) on the ledger, last, so a kill before it makes the next run redo
    the metadata.  Call it under the writer lock, after ``latest``."""
    ids = sorted({i for i in image_ids if i})
    if not ids:
        return Reconciled()
    ledger = store.ledger_frame(tables.files, [*IDENTITY, "image_id", "status", "meta_hash"])
    live = ledger.filter(pl.col("image_id").is_in(ids), pl.col("status").is_in(LIVE_STATUSES))
    winners = (live.sort("source_uri").group_by("image_id", maintain_order=True).first()
               .select("image_id", *IDENTITY))
    current = store.image_rows(tables.images, ids, [*IDENTITY, *META_VALUES])
    gone = current.join(winners, on="image_id", how="anti")["image_id"].to_list()
    changed, n_meta, n_moved = _changes(current, _wanted(current, winners, meta))
    store.delete_images(tables.images, gone)
    store.update_images(tables.images, changed.to_arrow().cast(
        _schema(tables.images, changed.columns)))
    forget_captions(tables.images, _recaptioned(current, changed))
    store.update_files(tables.files, _ledger_fixes(live, winners, hashes).to_arrow())
    return Reconciled(len(gone), n_meta, n_moved)


def _wanted(current: pl.DataFrame, winners: pl.DataFrame,
            meta: pl.DataFrame | None) -> pl.DataFrame:
    """What each stored row should hold: its winner's identity; the winner's metadata when the
    winner is in ``meta``, else the metadata it has."""
    w = current.join(winners.rename({c: f"{c}_w" for c in IDENTITY}), on="image_id")
    if meta is None:
        meta = pl.DataFrame(schema={"source_uri": pl.String} | {
            c: current.schema[c] for c in META_VALUES})
    m = meta.select("source_uri", *META_VALUES).rename({c: f"{c}_m" for c in META_VALUES})
    w = w.join(m.with_columns(_has=pl.lit(True)), left_on="source_uri_w",
               right_on="source_uri", how="left")
    return w.select(
        "image_id", *[pl.col(f"{c}_w").alias(c) for c in IDENTITY],
        *[pl.when(pl.col("_has")).then(pl.col(f"{c}_m").cast(current.schema[c]))
          .otherwise(pl.col(c)).alias(c) for c in META_VALUES],
    )


def _changes(current: pl.DataFrame, wanted: pl.DataFrame) -> tuple[pl.DataFrame, int, int]:
    """The wanted rows that differ from the stored ones; how many differ in metadata, in
    identity."""
    cols = [*IDENTITY, *META_VALUES]
    both = wanted.join(current.rename({c: f"{c}_now" for c in cols}), on="image_id")

    def differs(names) -> pl.Expr:
        return pl.any_horizontal([pl.col(c).ne_missing(pl.col(f"{c}_now")) for c in names])

    both = both.with_columns(_meta=differs(META_VALUES), _id=differs(IDENTITY))
    changed = both.filter(pl.col("_meta") | pl.col("_id"))
    return (changed.select("image_id", *cols), int(changed["_meta"].sum()),
            int(changed["_id"].sum()))


def _recaptioned(current: pl.DataFrame, changed: pl.DataFrame) -> list[str]:
    """Ids of the changed rows whose caption text is not the stored one."""
    both = changed.select("image_id", "caption").join(
        current.select("image_id", pl.col("caption").alias("_now")), on="image_id")
    return both.filter(pl.col("caption").ne_missing(pl.col("_now")))["image_id"].to_list()


def _schema(images, columns: list[str]) -> pa.Schema:
    return pa.schema([images.schema.field(c) for c in columns])


def _ledger_fixes(live: pl.DataFrame, winners: pl.DataFrame,
                  hashes: pl.DataFrame | None) -> pl.DataFrame:
    """(source_uri, status, meta_hash) of the ledger rows whose status (ingested for the
    winner, else duplicate) or meta_hash must change."""
    rows = live.join(winners.select("image_id", pl.col("source_uri").alias("_w")), on="image_id")
    rows = rows.with_columns(_status=pl.when(pl.col("source_uri") == pl.col("_w"))
                             .then(pl.lit("ingested")).otherwise(pl.lit("duplicate")))
    if hashes is not None and hashes.height:
        rows = rows.join(hashes.select("source_uri", pl.col("meta_hash").alias("_h")),
                         on="source_uri", how="left")
    else:
        rows = rows.with_columns(_h=pl.lit(None, pl.String))
    rows = rows.with_columns(_h=pl.coalesce("_h", "meta_hash"))
    fix = rows.filter((pl.col("status") != pl.col("_status"))
                      | pl.col("meta_hash").ne_missing(pl.col("_h")))
    return fix.select("source_uri", status=pl.col("_status"), meta_hash=pl.col("_h"))
