"""Bulk retrieval: 1,000 queries at 100k (and 1M) rows, brute force vs ANN indexes, recall@10.

Vectors are 512-d, L2-normalised, drawn from a mixture of 1,000 clusters (real CLIP embeddings
are clustered; uniform random vectors would make every ANN index look bad).  Queries come from
the same distribution.  Search cost does not depend on the embedding model, so no model runs.
"""

from __future__ import annotations

import os
import tempfile
import time

import numpy as np

from benchmarks.common import record

SIZES = [int(s) for s in os.environ.get("BENCH_RETRIEVAL_ROWS", "100000").split(",")]
N_QUERIES, K, DIM, PER_CALL = 1000, 10, 512, 100


def clustered(n: int, rng: np.random.Generator, centers: np.ndarray) -> np.ndarray:
    pick = rng.integers(0, len(centers), n)
    x = centers[pick] + rng.normal(scale=0.35, size=(n, DIM)).astype(np.float32) / np.sqrt(DIM)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def build_table(n: int):
    import lancedb
    import pyarrow as pa

    rng = np.random.default_rng(0)
    centers = rng.normal(size=(1000, DIM)).astype(np.float32)
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    db = lancedb.connect(tempfile.mkdtemp(prefix="bench-ret-"))
    table = None
    for start in range(0, n, 100_000):
        v = clustered(min(100_000, n - start), rng, centers)
        data = pa.table({"id": pa.array(np.arange(start, start + len(v))),
                         "vector": pa.FixedSizeListArray.from_arrays(pa.array(v.reshape(-1)),
                                                                    DIM)})
        table = db.create_table("images", data) if table is None else table
        if start:
            table.add(data)
    return table, clustered(N_QUERIES, rng, centers)


def search_all(table, queries: np.ndarray, **tune) -> tuple[float, list[np.ndarray]]:
    ids, start = [], time.perf_counter()
    for i in range(0, len(queries), PER_CALL):
        q = table.search(queries[i : i + PER_CALL]).distance_type("cosine").limit(K)
        for name, value in tune.items():
            q = getattr(q, name)(value)
        r = q.select(["id", "_distance"]).to_arrow()
        qi, rid = r["query_index"].to_numpy(), r["id"].to_numpy()
        ids += [rid[qi == j] for j in range(len(queries[i : i + PER_CALL]))]
    return len(queries) / (time.perf_counter() - start), ids


def recall(exact: list[np.ndarray], approx: list[np.ndarray]) -> float:
    return float(np.mean([len(np.intersect1d(e, a)) / K for e, a in zip(exact, approx,
                                                                          strict=True)]))


INDEXES = {
    "IVF_SQ": dict(index_type="IVF_SQ"),
    "IVF_PQ": dict(index_type="IVF_PQ", num_sub_vectors=64),
}
TUNING = {"IVF_SQ": [dict(nprobes=20), dict(nprobes=20, refine_factor=5)],
          "IVF_PQ": [dict(nprobes=20, refine_factor=10)]}


def bench_size(n: int) -> dict:
    table, queries = build_table(n)
    brute_qps, exact = search_all(table, queries)
    out = {"rows": n, "queries": N_QUERIES, "brute_force_qps": round(brute_qps, 1)}
    chosen = os.environ.get("BENCH_RETRIEVAL_INDEXES", "IVF_SQ,IVF_PQ").split(",")
    for name, params in ((k, v) for k, v in INDEXES.items() if k in chosen):
        parts = max(16, int(np.sqrt(n)))
        start = time.perf_counter()
        table.create_index(metric="cosine", num_partitions=parts, replace=True,
                           vector_column_name="vector", **params)
        build = time.perf_counter() - start
        for tune in TUNING[name]:
            qps, approx = search_all(table, queries, **tune)
            label = name + "".join(f" {k}={v}" for k, v in tune.items())
            out[label] = {"build_s": round(build, 1), "qps": round(qps, 1),
                          "speedup": round(qps / brute_qps, 2),
                          "recall@10": round(recall(exact, approx), 3)}
    return out


def main() -> None:
    for n in SIZES:
        record("retrieval", bench_size(n))
