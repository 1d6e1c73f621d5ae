"""``mmrag query`` against a real Ray cluster started with ``ray start --head``: the generation
replicas (and, for a large queries file, the query embedding) run on the cluster's workers."""

from __future__ import annotations

import json
import subprocess
import sys

import polars as pl
import pytest
from ray_cluster import driver_logs, head, job_workers

pytestmark = pytest.mark.slow


def test_query_runs_on_the_cluster(tmp_path, cache_dir, sample_dump, ray_session):
    from flows.ingest import ingest_flow
    from mmrag.settings import Settings

    settings = Settings(db=str(tmp_path / "db"), profile="tiny", cache_dir=str(cache_dir),
                        work_dir=str(tmp_path / "w"), embed_actor_cpus=0.5, decode_cpus=0.25)
    ingest_flow.fn(str(sample_dump), settings)
    queries = tmp_path / "q.jsonl"
    queries.write_text("".join(json.dumps({"query_id": f"q{i}", "text": t, "top_k": 3}) + "\n"
                               for i, t in enumerate(["a street", "is it safe?", "trees"])))
    with head() as (address, temp, env):
        before = driver_logs(temp)
        env = env | {"MMRAG_RAY_ADDRESS": address, "MMRAG_PROFILE": "tiny",
                     "MMRAG_DB": settings.db, "MMRAG_CACHE_DIR": str(cache_dir),
                     "MMRAG_WORK_DIR": str(tmp_path / "w"), "MMRAG_OUT": str(tmp_path / "out"),
                     "MMRAG_MAX_NEW_TOKENS": "4", "MMRAG_GEN_REPLICAS": "2",
                     "MMRAG_GEN_REPLICA_CPUS": "0.5", "MMRAG_EMBED_ACTOR_CPUS": "0.5",
                     "MMRAG_QUERY_RAY_MIN_QUERIES": "2"}  # embed in Ray too
        run = subprocess.run([sys.executable, "-m", "mmrag.cli", "query", str(queries),
                              "--run-id", "cluster", "--run-date", "2026-03-02"], env=env,
                             capture_output=True, text=True, timeout=600, cwd=tmp_path)
        assert run.returncode == 0, run.stderr[-3000:]
        new = [n for n in driver_logs(temp) if n not in before]
        assert len(new) == 1, (before, new)  # the query's driver registered with this head
        assert job_workers(temp, new[0]), "no worker of the query's job ran on the cluster"
    out = pl.read_parquet(tmp_path / "out" / "answers" / "run_date=2026-03-02" /
                          "cluster.parquet").sort("query_id")
    assert out["query_id"].to_list() == ["q0", "q1", "q2"]
    assert out["error"].null_count() == 3 and out["answer"].null_count() == 0
    assert [len(r) for r in out["retrieved"].to_list()] == [3, 3, 3]
