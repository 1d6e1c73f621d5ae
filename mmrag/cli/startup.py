"""Start-up in parallel: Prefect's temporary API server starts in a thread while the command
warms its own workers (Ray), instead of one after the other.

Without ``PREFECT_API_URL`` Prefect starts a temporary server the first time a flow needs its
API (about 4 s on 2 cores, most of it in the server's own process, the caller only polling).
Starting it here, through the same per-process instance Prefect itself uses, lets the command's
other start-up work run meanwhile; the flow then finds the server up.  With ``PREFECT_API_URL``
set (a running server, reused as is) nothing starts.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator


def temporary_server_needed() -> bool:
    """True when a flow would start Prefect's temporary server (no API URL, ephemeral mode on)."""
    from prefect.settings import get_current_settings

    current = get_current_settings()
    return not current.api.url and bool(current.server.ephemeral.enabled)


def start_temporary_server() -> None:
    """Prefect's own temporary server, started once per process (later calls return at once)."""
    from prefect.server.api.server import SubprocessASGIServer

    SubprocessASGIServer().start()


@contextlib.contextmanager
def prefect_server_in_background(start: Callable[[], None] = start_temporary_server
                                 ) -> Iterator[None]:
    """Start the temporary server in a thread for the duration of the block; leaving the block
    waits for it, and a server that failed to start raises here (the flow would fail anyway)."""
    if not temporary_server_needed():
        yield
        return
    failure: list[BaseException] = []

    def run() -> None:
        try:
            start()
        except Exception as e:  # noqa: BLE001 - re-raised in the caller's thread below
            failure.append(e)

    thread = threading.Thread(target=run, name="prefect-server-start", daemon=True)
    thread.start()
    try:
        yield
    finally:
        thread.join()
    if failure:
        raise failure[0]
