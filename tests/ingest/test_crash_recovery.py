"""SIGKILL an ingest process partway through, then re-run: exactly the expected rows."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import lancedb
import pytest
from conftest import tables

from flows.ingest import ingest_flow
from mmrag.settings import Settings

pytestmark = pytest.mark.slow

N = 160
SCRIPT = (
    "import sys\n"
    "from flows.ingest import ingest_flow\n"
    "from mmrag.settings import Settings\n"
    "ingest_flow.fn(sys.argv[1], Settings())\n"
)


def _ledger_rows(db: str) -> int:
    try:
        return lancedb.connect(db).open_table("files").count_rows()
    except Exception:  # noqa: BLE001 - table not created yet
        return 0


def test_killed_ingest_leaves_nothing_half_done(tmp_path, cache_dir, ray_session):
    from mmrag.samples.dump import generate_sample_dump

    dump = tmp_path / "dump"
    generate_sample_dump(dump, N, seed=7)
    env = os.environ | {
        "MMRAG_DB": str(tmp_path / "db"), "MMRAG_PROFILE": "tiny",
        "MMRAG_CACHE_DIR": str(cache_dir), "MMRAG_WORK_DIR": str(tmp_path / "work"),
        "MMRAG_COMMIT_ROWS": "8", "MMRAG_BATCH_SIZE": "8", "MMRAG_DECODE_BATCH_SIZE": "4",
        "MMRAG_EMBED_ACTOR_CPUS": "0.5", "MMRAG_DECODE_CPUS": "0.25",
    }
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT, str(dump)], env=env,
                            start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while _ledger_rows(env["MMRAG_DB"]) < 16 and proc.poll() is None:
        assert time.monotonic() < deadline, "ingest made no progress"
        time.sleep(0.05)
    assert proc.poll() is None, "ingest finished before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = _ledger_rows(env["MMRAG_DB"])
    assert 16 <= done_before < N

    settings = Settings(db=env["MMRAG_DB"], profile="tiny", cache_dir=str(cache_dir),
                        work_dir=str(tmp_path / "work"), embed_actor_cpus=0.5,
                        decode_cpus=0.25)
    summary = ingest_flow.fn(str(dump), settings)
    assert summary["unchanged"] >= done_before and summary["todo"] == N - summary["unchanged"]
    t = tables(settings.db)
    assert t["files"].height == N and t["files"]["source_uri"].n_unique() == N
    assert t["images"].height == N and t["images"]["image_id"].n_unique() == N
    assert set(t["files"]["image_id"]) == set(t["images"]["image_id"])
    assert (t["files"]["status"] == "ingested").all()
    assert t["rejects"].height == 0
