"""Two processes ingest the same dump into the same database at the same time.

LanceDB's ``merge_insert`` of the same new keys from two processes duplicates rows (measured
with LanceDB 0.40); the per-table writer lock (``tasks.io.store.writer_lock``) serialises every
commit, and each commit re-checks what is stored under the lock, so the result must equal one
ingest's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import tables

from flows.ingest import ingest_flow

pytestmark = pytest.mark.slow

N = 60
SCRIPT = """
import json, os, sys, time
from pathlib import Path
from flows.ingest import ingest_flow
from mmrag.settings import Settings
from tasks.io.cluster import RayConfig, init_ray

settings = Settings()
init_ray(RayConfig(settings.ray_address, settings.ray_num_cpus,
                   settings.cache_dir + "/ray"))
Path(sys.argv[2] + ".ready." + str(os.getpid())).touch()
while not Path(sys.argv[2]).exists():
    time.sleep(0.01)
print(json.dumps(ingest_flow.fn(sys.argv[1], settings)))
"""


def _start(dump: Path, go: Path, env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", SCRIPT, str(dump), str(go)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_ready(go: Path, procs: list, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while len(list(go.parent.glob(go.name + ".ready.*"))) < len(procs):
        assert all(p.poll() is None for p in procs), procs[0].communicate()[1][-2000:]
        assert time.monotonic() < deadline, "writers never got ready"
        time.sleep(0.05)


def _keys(t: dict) -> dict:
    return {
        "images": sorted(t["images"]["image_id"].to_list()),
        "files": sorted(t["files"].select("source_uri", "image_id").rows(), key=str),
        "statuses": sorted(t["files"]["status"].value_counts().rows()),
        "rejects": sorted(t["rejects"].select("source_uri", "stage").rows()),
    }


def test_two_writers_make_exactly_one_ingest(tmp_path, settings, cache_dir, ray_session):
    from mmrag.samples.dump import generate_sample_dump, write_bad_inputs

    dump = tmp_path / "dump"
    generate_sample_dump(dump, N, seed=11)
    write_bad_inputs(dump, tmp_path / "outside")
    go = tmp_path / "go"
    env = os.environ | {
        "MMRAG_DB": settings.db, "MMRAG_PROFILE": "tiny", "MMRAG_CACHE_DIR": str(cache_dir),
        "MMRAG_WORK_DIR": settings.work_dir, "MMRAG_COMMIT_ROWS": "8", "MMRAG_BATCH_SIZE": "8",
        "MMRAG_DECODE_BATCH_SIZE": "4", "MMRAG_EMBED_ACTOR_CPUS": "0.25",
        "MMRAG_DECODE_CPUS": "0.25",
        # both drivers join the session's Ray: no extra clusters on a small machine
        "MMRAG_RAY_ADDRESS": ray_session.get_runtime_context().gcs_address,
    }
    procs = [_start(dump, go, env) for _ in range(2)]
    _wait_ready(go, procs)
    go.touch()
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    summaries = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    # both planned every file before either committed: they really wrote at the same time
    assert all(s["todo"] >= N for s in summaries), summaries

    t = tables(settings.db)
    assert t["images"]["image_id"].n_unique() == t["images"].height
    assert t["files"]["source_uri"].n_unique() == t["files"].height
    assert t["rejects"].select("source_uri", "stage").n_unique() == t["rejects"].height
    assert (Path(settings.db + ".locks") / "images.lock").exists()

    alone = settings.model_copy(update={"db": str(tmp_path / "alone")})
    ingest_flow.fn(str(dump), alone)
    assert _keys(t) == _keys(tables(alone.db)), "two writers differ from one ingest"
