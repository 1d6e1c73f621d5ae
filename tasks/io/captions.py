"""The caption space's columns on an ``images`` table: their width, and adding them in place.

Tables written before caption vectors (schema version 1) have neither ``caption_vector`` nor
``caption_model``; they gain both as nulls (``add_columns``: one commit, no row rewritten, no
image read) on their next write, or through ``mmrag backfill --captions``.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from schemas.tables import CAPTION_COLUMNS, images_schema
from tasks.io.store import StoreError, id_filters, upgrade


def caption_width(images) -> int | None:
    """Width of the table's ``caption_vector`` column; None for a table written before it."""
    names = images.schema.names
    return images.schema.field("caption_vector").type.list_size if "caption_vector" in names \
        else None


def caption_columns(images, dim: int, width: int | None) -> None:
    """Give ``images`` the caption columns (``width`` wide; None = keep the table's, or the
    CLIP width), in place, as nulls: old rows are not rewritten and no image is read.

    A table whose caption column has another width but holds no caption vector yet is
    re-declared; one holding vectors of another width is refused (re-embed them with
    ``mmrag backfill --captions``)."""
    have = caption_width(images)
    if have is not None and (width is None or have == width):
        return
    if have is not None:
        if images.count_rows("caption_vector IS NOT NULL"):
            raise StoreError(
                f"table '{images.name}' holds {have}-d caption vectors; the configured caption "
                f"encoder makes {width}-d ones: re-embed them with `mmrag backfill --captions` "
                "(or set MMRAG_CAPTION_ENCODER/MMRAG_CAPTION_MODEL back)")
        images.drop_columns(list(CAPTION_COLUMNS))
    upgrade(images, images_schema(dim, width or dim))


def forget_captions(images, image_ids) -> int:
    """Null the caption vectors of rows whose caption changed (a caption refresh re-embeds
    them): a stale vector would match the old caption.  A table without the column is left
    as it is."""
    if caption_width(images) is None:
        return 0
    done = 0
    for n, where in id_filters(image_ids):
        images.update(where=where, values_sql={c: "NULL" for c in CAPTION_COLUMNS})
        done += n
    return done


def fixed_size(matrix: np.ndarray) -> pa.FixedSizeListArray:
    """(n, d) float32 → fixed_size_list<float32>[d]; a row with NaN becomes null."""
    matrix = np.asarray(matrix, dtype=np.float32)
    missing = np.isnan(matrix).any(axis=1) if matrix.size else np.zeros(len(matrix), bool)
    values = pa.array(np.nan_to_num(matrix).reshape(-1), pa.float32())
    return pa.FixedSizeListArray.from_arrays(values, matrix.shape[1],
                                             mask=pa.array(missing) if missing.any() else None)
