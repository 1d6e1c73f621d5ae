"""``mmrag ingest`` against a real Ray cluster started with ``ray start --head``.

The cluster recipe (own session id, token authentication, teardown of exactly that session) is
``tests/ray_cluster.py``, shared with the query flow's cluster test.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import tables
from ray_cluster import driver_logs, head, job_workers

pytestmark = pytest.mark.slow


@pytest.fixture
def cluster():
    """A 2-CPU head on a free port with its own temp dir (short: Ray's sockets live there)."""
    with head() as found:
        yield found


def test_ingest_runs_on_the_cluster(cluster, tmp_path, cache_dir):
    from mmrag.samples.dump import generate_sample_dump

    address, temp, env = cluster
    dump = tmp_path / "dump"
    generate_sample_dump(dump, 8, seed=5)
    before = driver_logs(temp)
    env = env | {"MMRAG_RAY_ADDRESS": address, "MMRAG_PROFILE": "tiny",
                 "MMRAG_DB": str(tmp_path / "db"), "MMRAG_CACHE_DIR": str(cache_dir),
                 "MMRAG_WORK_DIR": str(tmp_path / "w"), "MMRAG_EMBED_ACTOR_CPUS": "0.5",
                 "MMRAG_DECODE_CPUS": "0.25"}
    run = subprocess.run([sys.executable, "-m", "mmrag.cli", "ingest", str(dump)], env=env,
                         capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert tables(str(tmp_path / "db"))["images"].height == 8
    new = [n for n in driver_logs(temp) if n not in before]
    assert len(new) == 1, (before, new)  # the ingest's driver registered with this head
    assert job_workers(temp, new[0]), f"no worker of the ingest's job ran on the cluster ({new})"
