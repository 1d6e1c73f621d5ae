"""A Prefect server and a Ray head kept running between commands, as a scheduled deployment keeps
them (``prefect server start``, ``ray start --head``): the ingest benchmark's "running services"
runs point ``mmrag`` at them instead of letting each command start its own."""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_services(work: Path) -> Iterator[dict[str, str]]:
    """Start both, wait until they answer, yield the environment a command needs to use them;
    stop both after.  The Ray head runs with ``--block``: its daemons end with that process.
    Ray 2.60 turns token authentication on when a token exists, so both sides get one."""
    work.mkdir(parents=True, exist_ok=True)
    prefect_port, ray_port = free_port(), free_port()
    api = f"http://127.0.0.1:{prefect_port}/api"
    env = {"PREFECT_API_URL": api, "MMRAG_RAY_ADDRESS": f"127.0.0.1:{ray_port}",
           "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16)}
    procs = []
    try:
        procs.append(_spawn(
            ["prefect", "server", "start", "--host", "127.0.0.1", "--port", str(prefect_port)],
            work / "prefect.log",
            PREFECT_HOME=str(work / "prefect"), PREFECT_UI_ENABLED="false",
            PREFECT_SERVER_ANALYTICS_ENABLED="false"))
        procs.append(_spawn(
            ["ray", "start", "--head", "--block", f"--port={ray_port}",
             f"--num-cpus={os.cpu_count()}", f"--temp-dir={work / 'ray'}",
             "--include-dashboard=false", "--disable-usage-stats"], work / "ray.log",
            **{k: v for k, v in env.items() if k.startswith("RAY_")}))
        _wait(lambda: _answers(f"{api}/health"), procs, work / "prefect.log")
        _wait(lambda: "Ray runtime started" in (work / "ray.log").read_text(), procs,
              work / "ray.log")
        yield env
    finally:
        for proc in reversed(procs):
            _stop(proc)


def _spawn(cmd: list[str], log: Path, **env: str) -> subprocess.Popen:
    with log.open("w") as out:
        return subprocess.Popen([str(BIN / cmd[0]), *cmd[1:]], stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True,
                                env=os.environ | env)


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:  # noqa: S310 - loopback http
            return r.status == 200
    except OSError:
        return False


def _wait(ready, procs: list[subprocess.Popen], log: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if any(p.poll() is not None for p in procs) or time.monotonic() > deadline:
            raise SystemExit(f"a service did not start; its log: {log}")
        time.sleep(0.5)


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM the service's process group, wait up to 30 s, then SIGKILL what is left."""
    with suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    with suppress(subprocess.TimeoutExpired):
        proc.wait(30)
    with suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
