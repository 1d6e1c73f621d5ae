"""Prefect's temporary server, started by the command before it imports its flow."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from prefect.settings import PREFECT_API_URL, temporary_settings

from mmrag.cli import startup
from mmrag.cli.startup import TemporaryServer, free_port


def test_no_server_starts_when_prefect_has_an_api_url(monkeypatch):
    launched = []
    monkeypatch.setattr(TemporaryServer, "start", lambda self: launched.append(self))
    with temporary_settings(updates={PREFECT_API_URL: "http://127.0.0.1:4200/api"}):
        assert startup.start_server() is None
        startup.ready(None)
    assert launched == []


def test_one_server_per_process_relaunched_once_stopped(monkeypatch):
    launched = []

    def start(self):
        launched.append(self)
        self.process = object()
        return self

    monkeypatch.setattr(TemporaryServer, "start", start)
    monkeypatch.setattr(startup, "temporary_server_needed", lambda: True)
    monkeypatch.setattr(startup, "_STARTED", [])
    first = startup.start_server()
    assert startup.start_server() is first and launched == [first]
    first.process = None  # stopped (e.g. by its exit handler)
    assert startup.start_server() is first and launched == [first, first]
    first.process = None  # nothing real to stop at exit


def process(code: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code])


def test_a_server_that_exits_is_a_prefect_server_error():
    server = TemporaryServer()
    server.port, server.process = free_port(), process("import sys; sys.exit(1)")
    with pytest.raises(RuntimeError, match="temporary Prefect server exited with status 1"):
        server.wait(30)


def test_a_server_that_never_answers_times_out():
    server = TemporaryServer()
    server.port, server.process = free_port(), process("import time; time.sleep(30)")
    try:
        with pytest.raises(RuntimeError, match="Prefect server did not answer within 1 s"):
            server.wait(1)
    finally:
        server.stop()
    assert server.process is None


def test_a_port_taken_meanwhile_is_retried_on_another(monkeypatch, tmp_path):
    """uvicorn exits with status 3 when its port was taken between the choice and the bind:
    the server is launched again on a fresh port (here a plain HTTP server that answers the
    health path with 200)."""
    (tmp_path / "api").mkdir()
    (tmp_path / "api" / "health").write_text("true")

    def start(self):
        self.port = free_port()
        self.process = subprocess.Popen([sys.executable, "-m", "http.server", str(self.port),
                                         "--bind", "127.0.0.1", "--directory", str(tmp_path)],
                                        stderr=subprocess.DEVNULL)
        return self

    server = TemporaryServer()
    server.port, server.process = 1, process("import sys; sys.exit(3)")
    monkeypatch.setattr(TemporaryServer, "start", start)
    try:
        server.wait(30)
        assert server.port != 1 and server.healthy()
    finally:
        server.stop()


CHILD = textwrap.dedent("""
    import json, os, sys
    from mmrag.cli import startup
    server = startup.start_server()
    from prefect import flow

    @flow
    def double(x):
        return 2 * x

    startup.ready(server)
    from prefect.settings import get_current_settings
    print(json.dumps({"server_pid": server.process.pid, "api_url": server.api_url,
                      "prefect_url": get_current_settings().api.url, "result": double(21),
                      "parent_imported_server_app": "prefect.server.api.server" in sys.modules}))
""")


@pytest.mark.slow
def test_a_flow_runs_against_the_server_the_command_started(tmp_path):
    """The whole path in a fresh process: the server runs in its own process, Prefect's
    settings point at it, a flow runs there, the parent never imports the server app, and the
    server is gone after the parent exits."""
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    run = subprocess.run([sys.executable, "-c", CHILD], env=env | {"PREFECT_HOME": str(tmp_path)},
                         capture_output=True, text=True, timeout=180, check=True)
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["result"] == 42
    assert out["prefect_url"] == out["api_url"]
    assert out["server_pid"] != os.getpid()
    assert out["parent_imported_server_app"] is False
    assert not Path(f"/proc/{out['server_pid']}").exists()


KILLED_CHILD = textwrap.dedent("""
    import time
    from mmrag.cli import startup
    server = startup.start_server()
    startup.ready(server)
    print(server.process.pid, flush=True)
    time.sleep(120)
""")


def _gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"
    except OSError:
        return True


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_the_server_goes_when_the_command_is_killed(tmp_path):
    """SIGKILL runs no exit handler: the server must still not outlive the command."""
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    child = subprocess.Popen([sys.executable, "-c", KILLED_CHILD], stdout=subprocess.PIPE,
                             env=env | {"PREFECT_HOME": str(tmp_path)}, text=True)
    server_pid = int(child.stdout.readline())
    assert not _gone(server_pid)
    child.kill()
    child.wait()
    deadline = time.monotonic() + 15
    while not _gone(server_pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _gone(server_pid), "the Prefect server outlived the killed command"
