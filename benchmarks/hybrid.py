"""Hybrid search with and without reranking, through the query flow's own search code.

100k rows of clustered 512-d vectors with 8-word captions drawn from a 300-word vocabulary
(full-text indexed); 200 hybrid queries of 3 words plus a vector.  Baseline: plain hybrid (RRF)
in the same run; reranking fetches ``rerank_depth`` candidates and rescores them by similarity.
"""

from __future__ import annotations

import os
import tempfile
import time
from datetime import UTC, datetime

import numpy as np
import polars as pl
import pyarrow as pa

from benchmarks.common import record
from benchmarks.retrieval import DIM, build_table

ROWS = int(os.environ.get("BENCH_HYBRID_ROWS", "100000"))
N_QUERIES, TOP_K, WORDS = 200, 10, [f"w{i:03d}" for i in range(300)]


def images_table(n: int):
    """The retrieval benchmark's vectors, as an ``images`` table with captions and metadata."""
    import lancedb
    from lancedb.index import FTS

    from schemas.tables import SCORE_COLUMNS, images_schema

    base, queries = build_table(n)
    vectors = base.to_arrow()["vector"]
    rng = np.random.default_rng(1)
    captions = [" ".join(rng.choice(WORDS, 8)) for _ in range(n)]
    ids = [f"{i:064x}" for i in range(n)]
    cols = {"image_id": ids, "source_uri": ids, "rel_path": ids, "file_name": ids,
            "city": ["Paris"] * n, "caption": captions, "width": [640] * n, "height": [480] * n,
            "clip_model": ["bench"] * n, "run_id": ["bench"] * n,
            "ingested_at": [datetime.now(UTC)] * n, **{c: [5.0] * n for c in SCORE_COLUMNS}}
    schema = images_schema(DIM)
    data = pa.table({f.name: cols.get(f.name, [None] * n) for f in schema if f.name != "vector"}
                    | {"vector": vectors}, schema=schema)
    table = lancedb.connect(tempfile.mkdtemp(prefix="bench-hyb-")).create_table("images_h", data)
    table.create_index("caption", config=FTS())
    return table, queries[:N_QUERIES], rng


def run(table, vectors: np.ndarray, texts: list[str], opts: dict) -> tuple[float, dict]:
    from tasks.query.retrieve import Pinned, search_all

    plan = pl.DataFrame({"mode": "hybrid", "text": texts, "where": None, "top_k": TOP_K,
                         "error": None}, schema_overrides={"where": pl.String,
                                                           "error": pl.String})
    start = time.perf_counter()
    hits = search_all(Pinned(table, table.version, "images_h"), plan, vectors, {}, opts)
    return len(texts) / (time.perf_counter() - start), hits


def main() -> None:
    table, vectors, rng = images_table(ROWS)
    texts = [" ".join(rng.choice(WORDS, 3)) for _ in range(len(vectors))]
    run(table, vectors[:5], texts[:5], {})  # warm the FTS index and caches
    plain, _ = run(table, vectors, texts, {})
    out = {"rows": ROWS, "queries": len(texts), "plain_qps": round(plain, 1)}
    for depth in (50, 100):
        qps, _ = run(table, vectors, texts, {"rerank_weight": 0.5, "rerank_depth": depth})
        out[f"rerank depth {depth}"] = {"qps": round(qps, 1), "ratio": round(qps / plain, 2)}
    record("hybrid", out)
