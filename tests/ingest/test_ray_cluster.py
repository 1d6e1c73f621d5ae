"""``mmrag ingest`` against a real Ray cluster started with ``ray start --head``.

Everything Ray runs in subprocesses: this test never calls ``ray.init`` (the session's local
Ray may already live in this process).  The head runs in its own session id, and teardown
kills exactly that session's processes: ``ray stop`` would kill every Ray on the machine,
including other test runs' and other users'.

Ray 2.60 enables token authentication on a new head when a token exists, and a driver given
an explicit address does not enable it by itself: both sides get ``RAY_AUTH_MODE=token`` and
a throw-away ``RAY_AUTH_TOKEN`` here.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import tables

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _session_members(sid: int) -> list[int]:
    """PIDs whose session id is ``sid``: the head's daemons and the workers they started."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[3]) == sid:
            pids.append(int(entry))
    return pids


def _stop_session(sid: int, grace: float = 5) -> None:
    """SIGTERM the head's processes, SIGKILL what is left after ``grace`` seconds."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 0)):
        for pid in _session_members(sid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while _session_members(sid) and time.monotonic() < deadline:
            time.sleep(0.2)


@pytest.fixture
def cluster():
    """A 2-CPU head on a free port with its own temp dir (short: Ray's sockets live there)."""
    port, temp = _free_port(), tempfile.mkdtemp(prefix="mmrag-ray-", dir="/tmp")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env |= {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16),
            "RAY_USAGE_STATS_ENABLED": "0"}
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", f"--port={port}", "--num-cpus=2",
         f"--temp-dir={temp}", "--include-dashboard=false", "--disable-usage-stats"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True)
    try:
        out, _ = head.communicate(timeout=180)
        assert head.returncode == 0, out[-3000:]
        yield f"127.0.0.1:{port}", Path(temp), env
    finally:
        _stop_session(head.pid)
        shutil.rmtree(temp, ignore_errors=True)


def _driver_logs(temp: Path) -> list[str]:
    logs = temp / "session_latest" / "logs"
    return sorted(p.name for p in logs.glob("python-core-driver-*.log"))


def test_ingest_runs_on_the_cluster(cluster, tmp_path, cache_dir):
    from mmrag.samples.dump import generate_sample_dump

    address, temp, env = cluster
    dump = tmp_path / "dump"
    generate_sample_dump(dump, 8, seed=5)
    before = _driver_logs(temp)
    env = env | {"MMRAG_RAY_ADDRESS": address, "MMRAG_PROFILE": "tiny",
                 "MMRAG_DB": str(tmp_path / "db"), "MMRAG_CACHE_DIR": str(cache_dir),
                 "MMRAG_WORK_DIR": str(tmp_path / "w"), "MMRAG_EMBED_ACTOR_CPUS": "0.5",
                 "MMRAG_DECODE_CPUS": "0.25"}
    run = subprocess.run([sys.executable, "-m", "mmrag.cli", "ingest", str(dump)], env=env,
                         capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert tables(str(tmp_path / "db"))["images"].height == 8
    new = [n for n in _driver_logs(temp) if n not in before]
    assert len(new) == 1, (before, new)  # the ingest's driver registered with this head
    # the driver's worker id is its job id (8 hex digits) padded with ff…; workers log the job id
    job = new[0].removeprefix("python-core-driver-")[:8]
    workers = list((temp / "session_latest" / "logs").glob(f"worker-*-{job}-*.out"))
    assert workers, f"no worker of job {job} ran on the cluster"
