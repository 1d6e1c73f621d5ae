"""Prefect's temporary API server, started by the command in its first second.

Without ``PREFECT_API_URL`` Prefect starts a temporary server (``uvicorn`` running Prefect's
own app in a subprocess) the first time a flow needs its API.  Left to Prefect, that happens
only after the command has imported its flow (~5 s on 2 cores), and the parent process first
imports the whole server application (~3.5 s) just to launch that subprocess.  Started here
instead, with Prefect's own command line and environment, the server's ~5–8 s of start-up run on
the other core while this process imports, warms Ray and plans; the parent never imports the
server.  Once the server answers, the process points Prefect at it (``PREFECT_API_URL``, as
for any running server, inherited by the processes it starts) and stops it at exit, after
Prefect has flushed its logs to it.

With ``PREFECT_API_URL`` set (a running server, reused as is) or ephemeral mode off, nothing
starts.
"""

from __future__ import annotations

import atexit
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

PORT_IN_USE = 3  # uvicorn's exit status when it cannot bind


def prefect_defaults() -> None:
    """Quiet, patient defaults for the temporary server: analytics off, and a start-up timeout
    that a loaded 2-core machine can meet (Prefect's own 20 s is too close).  Model loading bars
    are off too: the flows report their own progress.  Set before Prefect reads its settings."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def temporary_server_needed() -> bool:
    """True when a flow would start Prefect's temporary server (no API URL, ephemeral mode on)."""
    from prefect.settings import get_current_settings

    current = get_current_settings()
    return not current.api.url and bool(current.server.ephemeral.enabled)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class TemporaryServer:
    """One Prefect API server in a subprocess, launched exactly as Prefect launches its own."""

    def __init__(self) -> None:
        self.process: subprocess.Popen | None = None
        self.port = 0
        atexit.register(self.stop)

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def start(self) -> TemporaryServer:
        import prefect
        from prefect.settings import get_current_settings

        self.port = free_port()
        env = {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1",
               "PREFECT__SERVER_FINAL": "1",
               **get_current_settings().to_environment_variables(exclude_unset=True)}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "--app-dir", str(Path(prefect.__file__).parents[1]),
             "--factory", "prefect.server.api.server:create_app", "--host", "127.0.0.1",
             "--port", str(self.port), "--log-level", "error", "--lifespan", "on"], env=env,
            preexec_fn=_dies_with(os.getpid()) if sys.platform.startswith("linux") else None)
        return self

    def wait(self, timeout_s: float) -> None:
        """Until the server answers its health check; a server that exits or stays silent is a
        ``RuntimeError`` naming the Prefect server (the CLI turns it into one line)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            status = self.process.poll()
            if status == PORT_IN_USE:
                self.start()
                continue
            if status is not None:
                raise RuntimeError(f"the temporary Prefect server exited with status {status}")
            if self.healthy():
                return
            time.sleep(0.1)
        raise RuntimeError(f"the temporary Prefect server did not answer within {timeout_s:.0f} s")

    def healthy(self) -> bool:
        import httpx

        try:
            return httpx.get(f"{self.api_url}/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None


def _dies_with(parent: int):
    """For the server's process, before it runs: SIGTERM it when PARENT dies, even killed by
    SIGKILL or the OOM killer, whose exit runs no clean-up (Linux's ``PR_SET_PDEATHSIG``, as Ray
    does for its own daemons); without it a killed hourly ingest left a server behind each
    time.  Launched from the main thread, which lives as long as the process."""
    def set_parent_death_signal() -> None:
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the parent died before the line above
            os._exit(0)
    return set_parent_death_signal


#: this process's server, at most one (Prefect keeps its own temporary server per process too)
_STARTED: list[TemporaryServer] = []


def start_server() -> TemporaryServer | None:
    """Launch the temporary server now, in its own process, when a flow will need one (None
    otherwise): a command calls it before importing its flow, so that the server starts while
    the command imports.  Later commands in the same process reuse it."""
    prefect_defaults()
    if not temporary_server_needed():
        return None
    if not _STARTED:
        _STARTED.append(TemporaryServer())
    if _STARTED[0].process is None:
        _STARTED[0].start()
    return _STARTED[0]


def ready(server: TemporaryServer | None) -> None:
    """Wait for a server from :func:`start_server`; then Prefect uses it for the rest of the
    process, as it would use its own temporary server."""
    if server is None:
        return
    from prefect.context import refresh_global_settings_context
    from prefect.settings import get_current_settings

    server.wait(get_current_settings().server.ephemeral.startup_timeout_seconds)
    os.environ["PREFECT_API_URL"] = server.api_url
    refresh_global_settings_context()
