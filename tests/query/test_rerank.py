"""Hybrid reranking: candidates rescored by CLIP similarity, fused with the RRF score."""

from __future__ import annotations

from datetime import UTC, datetime

import lancedb
import numpy as np
import polars as pl
import pyarrow as pa
import pytest
from lancedb.index import FTS

from schemas.tables import SCORE_COLUMNS, images_schema
from tasks.query.retrieve import Pinned, rerank, search_all

DIM = 8


def _row(i: int, caption: str, vector: np.ndarray) -> dict:
    schema = images_schema(DIM)
    row = {f.name: None for f in schema}
    row.update(image_id=f"img{i}", source_uri=f"/d/{i}.jpg", rel_path=f"{i}.jpg",
               file_name=f"{i}.jpg", city="Paris", width=64, height=64, clip_model="test",
               run_id="r", ingested_at=datetime.now(UTC),
               caption=caption, vector=vector.astype(np.float32).tolist(),
               **dict.fromkeys(SCORE_COLUMNS, 5.0))
    return row


@pytest.fixture
def pinned(tmp_path):
    """img0: the caption matches but the picture is orthogonal to the query vector;
    img1..img5: pictures close to the query, captions unrelated (a known answer for any model)."""
    rng = np.random.default_rng(0)
    query = np.eye(DIM)[0]
    rows = [_row(0, "red tram crossing the square", np.eye(DIM)[1])]
    for i in range(1, 6):
        v = query + 0.1 * i * np.eye(DIM)[2]  # cosine to the query falls with i
        rows.append(_row(i, f"quiet lane number {i}", v / np.linalg.norm(v)))
    for i in range(6, 30):
        v = rng.standard_normal(DIM)
        rows.append(_row(i, f"parking lot {i}", v / np.linalg.norm(v)))
    table = lancedb.connect(tmp_path).create_table(
        "images", pa.Table.from_pylist(rows, schema=images_schema(DIM)))
    table.create_index("caption", config=FTS())
    return Pinned(table, table.version, "images"), query.astype(np.float32)


def _search(pinned, opts: dict, top_k: int = 3) -> list[str]:
    pin, query = pinned
    plan = pl.DataFrame({"mode": ["hybrid"], "text": ["tram"], "where": [None],
                         "top_k": [top_k], "error": [None]},
                        schema_overrides={"where": pl.String, "error": pl.String})
    errors: dict = {}
    hits = search_all(pin, plan, query[None, :], errors, opts)
    assert not errors
    return [h["image_id"] for h in hits[0]]


def test_without_rerank_the_text_hit_is_fused_in(pinned):
    assert "img0" in _search(pinned, {})  # a full-text hit fused in by RRF


def test_full_weight_rerank_orders_by_similarity(pinned):
    got = _search(pinned, {"rerank_weight": 1.0, "rerank_depth": 20})
    assert got == ["img1", "img2", "img3"]  # the vectors built closest to the query, in order
    assert "img0" not in got


def test_partial_weight_keeps_top_k_and_scores_in_unit_range(pinned):
    pin, query = pinned
    plan = pl.DataFrame({"mode": ["hybrid"], "text": ["tram"], "where": [None], "top_k": [4],
                         "error": [None]}, schema_overrides={"where": pl.String,
                                                            "error": pl.String})
    hits = search_all(pin, plan, query[None, :], {}, {"rerank_weight": 0.5, "rerank_depth": 10})
    scores = [h["score"] for h in hits[0]]
    assert len(scores) == 4 and scores == sorted(scores, reverse=True)
    assert all(0.0 <= s <= 1.0 for s in scores)


def test_rerank_fuses_min_max_scaled_scores():
    frame = pl.DataFrame({"similarity": [0.2, 0.6, 1.0], "score": [0.03, 0.02, 0.01]})
    out = rerank(frame, 0.25)["score"].to_list()
    # similarity scaled → 0, .5, 1; rrf scaled → 1, .5, 0
    assert out == pytest.approx([0.75, 0.5, 0.25])
    flat = rerank(pl.DataFrame({"similarity": [0.5, 0.5], "score": [0.1, 0.1]}), 0.5)
    assert flat["score"].to_list() == [1.0, 1.0]
    with pytest.raises(ValueError, match="rerank_weight"):
        rerank(frame, 1.5)
