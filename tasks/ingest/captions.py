"""Caption vectors for the rows that lack them: old tables, changed captions, a new text model.

New images get their caption vector in the CLIP actor, beside the image vector
(``tasks.ingest.pipeline``).  Everything else goes through here, reading only the ``caption``
column (never an image byte):

- a table written before caption vectors gains the columns in place (``add_columns``), then
  every captioned row is embedded: ``mmrag backfill --captions``;
- a row whose caption changed had its caption vector nulled by ``tasks.ingest.reconcile``; the
  ingest flow refreshes those rows at the end of the run;
- a row embedded by another text model (``caption_model``) is re-embedded by the backfill; a
  model of another width re-declares the column first (older table versions keep the old one).

Rows are committed ``commit_rows`` at a time, each write (under the writer lock) only for rows
whose caption is still the text embedded, so a crash keeps what was committed, a re-run embeds
only what is still stale, and a caption changed meanwhile never gets a vector of its old text.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import polars as pl
import pyarrow as pa

from schemas.tables import CAPTION_COLUMNS, table_names, table_suffix
from tasks.io import store
from tasks.io.captions import caption_columns, caption_width, fixed_size
from tasks.io.objstore import StorageConfig
from tasks.models.clip import load_clip
from tasks.models.text import TextSpec, load_text, release_text, text_dim


@dataclass
class CaptionCounts:
    stale: int = 0
    embedded: int = 0
    upgraded: bool = False
    redeclared: bool = False
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return asdict(self)


def stale_filter(label: str) -> str:
    """Captioned rows whose caption vector is missing or made by another model."""
    return ("caption IS NOT NULL AND caption != '' AND (caption_vector IS NULL OR "
            f"caption_model IS NULL OR caption_model != {store.quote(label)})")


def open_images(db_uri: str, dim: int, clip_label: str, suffix: str | None = None,
                storage: StorageConfig | None = None):
    """The model's existing ``images`` table (a caption backfill never creates one)."""
    name = table_names(table_suffix(clip_label) if suffix is None else suffix)[0]
    try:
        images = store.connect(db_uri, storage).open_table(name)
    except ValueError as e:
        raise store.StoreError(f"no '{name}' table in {db_uri}: ingest first") from e
    store.check_model(images, dim, clip_label)
    return images


def prepare_columns(images, db_uri: str, dim: int, width: int, redeclare: bool) -> CaptionCounts:
    """Add the caption columns to an old table; with ``redeclare``, replace a column of
    another width (its vectors are of another model)."""
    counts = CaptionCounts()
    with store.writer_lock(db_uri, images.name):
        images.checkout_latest()
        have = caption_width(images)
        if redeclare and have is not None and have != width:
            images.drop_columns(list(CAPTION_COLUMNS))
            counts.redeclared, have = True, None
        caption_columns(images, dim, width)
        counts.upgraded = have is None and not counts.redeclared
    return counts


def stale_rows(images, label: str) -> pl.DataFrame:
    """image_id + caption of the rows to embed (blank captions left out)."""
    found = pl.from_arrow(images.search().where(stale_filter(label))
                          .select(["image_id", "caption"]).limit(None).to_arrow())
    return found.filter(pl.col("caption").str.strip_chars() != "").sort("image_id")


def refresh_captions(images, db_uri: str, text: TextSpec, *, commit_rows: int = 2048,
                     progress: Callable[[int], None] | None = None) -> CaptionCounts:
    """Embed every stale caption of ``images`` with ``text``; commit ``commit_rows`` at a time."""
    start, counts = time.perf_counter(), CaptionCounts()
    images.checkout_latest()
    todo = stale_rows(images, text.label)
    counts.stale = todo.height
    if not todo.height:
        return counts
    model = load_text(text)
    try:
        for part in todo.iter_slices(commit_rows):
            vectors = model.encode(part["caption"].to_list())
            with store.writer_lock(db_uri, images.name):
                images.checkout_latest()
                _write(images, part, vectors, text.label)
            counts.embedded += part.height
            if progress:
                progress(part.height)
    finally:
        release_text()
        load_clip.cache_clear()
    counts.seconds = round(time.perf_counter() - start, 3)
    return counts


def _write(images, part: pl.DataFrame, vectors: np.ndarray, label: str) -> None:
    """Set the caption columns of rows whose caption is still the text that was embedded.

    Call under the writer lock (every mmrag writer of the table takes it), so the check and
    the write see the same captions.  Not ``when_matched_update_all(where=…)``: with the
    ``image_id`` BTree index in place that panics in LanceDB 0.40 ("Incorrect number of arrays
    for StructArray fields")."""
    now = store.image_rows(images, part["image_id"].to_list(), ["caption"])
    keep = part.with_columns(_v=pl.int_range(part.height)).join(
        now.rename({"caption": "_now"}), on="image_id").filter(pl.col("caption") == pl.col("_now"))
    if not keep.height:
        return
    schema = images.schema
    table = pa.table({
        "image_id": pa.array(keep["image_id"].to_list(), pa.string()),
        "caption_vector": fixed_size(vectors[keep["_v"].to_numpy()]),
        "caption_model": pa.array([label] * keep.height, pa.string()),
    })
    table = table.cast(pa.schema([schema.field(n) for n in table.column_names]))
    images.merge_insert("image_id").when_matched_update_all().execute(table)


def backfill_captions(db_uri: str, dim: int, clip_label: str, text: TextSpec,
                      suffix: str | None = None, storage: StorageConfig | None = None,
                      commit_rows: int = 2048, progress=None) -> CaptionCounts:
    """Upgrade the table in place, then embed every caption it lacks: no image is read."""
    images = open_images(db_uri, dim, clip_label, suffix, storage)
    counts = prepare_columns(images, db_uri, dim, text_dim(text), redeclare=True)
    done = refresh_captions(images, db_uri, text, commit_rows=commit_rows, progress=progress)
    return CaptionCounts(done.stale, done.embedded, counts.upgraded, counts.redeclared,
                         done.seconds)
