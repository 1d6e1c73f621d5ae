"""A throw-away ``ray start --head`` cluster for the ingest and query cluster tests.

Everything Ray runs in subprocesses: the test never calls ``ray.init`` (the session's local
Ray may already live in the test process).  The head runs in its own session id, and teardown
kills exactly that session's processes: ``ray stop`` would kill every Ray on the machine.
Ray 2.60 enables token authentication on a new head when a token exists, and a driver given an
explicit address does not enable it by itself: both sides get ``RAY_AUTH_MODE=token`` and a
throw-away ``RAY_AUTH_TOKEN``.
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
from collections.abc import Iterator
from pathlib import Path

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def session_members(sid: int) -> list[int]:
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


def stop_session(sid: int, grace: float = 5) -> None:
    """SIGTERM the head's processes, SIGKILL what is left after ``grace`` seconds."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 0)):
        for pid in session_members(sid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while session_members(sid) and time.monotonic() < deadline:
            time.sleep(0.2)


@contextlib.contextmanager
def head(num_cpus: int = 2) -> Iterator[tuple[str, Path, dict]]:
    """(address, temp dir, environment for drivers) of a fresh head on a free port."""
    port, temp = free_port(), tempfile.mkdtemp(prefix="mmrag-ray-", dir="/tmp")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env |= {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16),
            "RAY_USAGE_STATS_ENABLED": "0"}
    proc = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", f"--port={port}", f"--num-cpus={num_cpus}",
         f"--temp-dir={temp}", "--include-dashboard=false", "--disable-usage-stats"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=180)
        assert proc.returncode == 0, out[-3000:]
        yield f"127.0.0.1:{port}", Path(temp), env
    finally:
        stop_session(proc.pid)
        shutil.rmtree(temp, ignore_errors=True)


def driver_logs(temp: Path) -> list[str]:
    logs = temp / "session_latest" / "logs"
    return sorted(p.name for p in logs.glob("python-core-driver-*.log"))


def job_workers(temp: Path, driver_log: str) -> list[Path]:
    """Worker logs of the job whose driver wrote ``driver_log``: the driver's worker id is its
    job id (8 hex digits) padded with ff…, and workers log the job id in their file names."""
    job = driver_log.removeprefix("python-core-driver-")[:8]
    return list((temp / "session_latest" / "logs").glob(f"worker-*-{job}-*.out"))
