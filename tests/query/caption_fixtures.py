"""A small images table with caption vectors, built from the tiny models (no Ray, no ingest).

Captions are picked by their vectors: the ones a query should find share no word with it but
are its nearest neighbours in the text model's space; the word-sharing distractors are the
candidates farthest from it.  Rows can be written as an old table (no caption columns).
"""

from __future__ import annotations

import hashlib
import itertools
from datetime import UTC, datetime

import lancedb
import numpy as np
import pyarrow as pa
from lancedb.index import FTS

from schemas.queries import QUERY_PLAN_SCHEMA
from schemas.tables import CAPTION_COLUMNS, images_schema
from tasks.models.clip import resolve_spec
from tasks.models.text import load_text, resolve_text

QUERY = "leafy avenue"
_WORDS = (
    "tree", "lined", "street", "quiet", "road", "shaded", "green", "path", "houses", "brick",
    "wall", "park", "bench", "river", "bridge", "tall", "tower", "market", "busy", "crossing",
    "cars", "parked", "old", "church",
)


def specs(cache_dir, encoder: str = "clip"):
    clip = resolve_spec("mmrag-tiny-clip", "tiny", str(cache_dir))
    return clip, resolve_text(encoder, "tiny", clip, str(cache_dir))


def pick_captions(text, n_pool: int = 60, n_relevant: int = 3, n_sharing: int = 4,
                  margin: float = 0.02):
    """(relevant, distractors, word-sharing distractors) chosen by similarity to ``QUERY``:
    the relevant ones are its nearest pool captions, every other caption is at least
    ``margin`` less similar (so float rounding cannot reorder them)."""
    model = load_text(text)
    query = model.encode([QUERY])[0]
    pool = [" ".join(c) for c in itertools.islice(itertools.combinations(_WORDS, 2), n_pool)]
    sims = model.encode(pool) @ query
    order = np.argsort(-sims)
    relevant = [pool[i] for i in order[:n_relevant]]
    bar = sims[order[n_relevant - 1]] - margin
    others = [pool[i] for i in order[n_relevant:] if sims[i] < bar]
    sharing = [f"avenue {w}" for w in _WORDS]
    near = model.encode(sharing) @ query
    sharing = [sharing[i] for i in np.argsort(near)[:n_sharing] if near[i] < bar]
    assert len(others) >= 10 and sharing, "the tiny model left no clear margin"
    return relevant, others, sharing


def write_table(db: str, clip, text, captions: list[str | None], cities: list[str] | None = None,
                old: bool = False):
    """The images table of ``captions`` (one row each; ``old``: schema version 1)."""
    from tasks.models.clip import model_shape

    dim = model_shape(clip)[0]
    n = len(captions)
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(n, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    ids = [hashlib.sha256(f"img{i}".encode()).hexdigest() for i in range(n)]
    rows = {"image_id": ids, "source_uri": [f"/gone/{i}.jpg" for i in range(n)],
            "rel_path": [f"{i}.jpg" for i in range(n)], "file_name": [f"{i}.jpg" for i in range(n)],
            "city": cities or ["A"] * n, "caption": captions, "width": [1] * n, "height": [1] * n,
            "clip_model": [clip.label] * n, "run_id": ["r"] * n,
            "ingested_at": [datetime.now(UTC)] * n}
    schema = images_schema(dim, None if old else load_text(text).dim)
    table = pa.table({f.name: pa.nulls(n, f.type) for f in schema})
    for name, values in rows.items():
        table = table.set_column(schema.get_field_index(name), name, pa.array(values))
    table = table.set_column(schema.get_field_index("vector"), "vector",
                             pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), dim))
    if old:
        table, schema = table.drop_columns(list(CAPTION_COLUMNS)), pa.schema(
            [f for f in schema if f.name not in CAPTION_COLUMNS])
    else:
        table = _with_captions(table, text, captions)
    images = lancedb.connect(db).create_table("images", table.cast(schema),
                                                  on_bad_vectors="null")
    images.create_index("caption", config=FTS())
    return images, dict(zip(captions, ids, strict=True))


def _with_captions(table: pa.Table, text, captions: list[str | None]) -> pa.Table:
    from tasks.io.captions import fixed_size

    model = load_text(text)
    matrix = np.full((len(captions), model.dim), np.nan, dtype=np.float32)
    idx = [i for i, c in enumerate(captions) if c]
    matrix[idx] = model.encode([captions[i] for i in idx])
    labels = pa.array([text.label if c else None for c in captions], pa.string())
    table = table.drop_columns(list(CAPTION_COLUMNS))
    return table.append_column("caption_vector", fixed_size(matrix)).append_column(
        "caption_model", labels)


def plan(rows: list[dict]):
    import polars as pl

    full = [{"row": i, "query_id": f"q{i}", "top_k": 3, **r} for i, r in enumerate(rows)]
    return pl.from_arrow(pa.Table.from_pylist(full, schema=QUERY_PLAN_SCHEMA))
