"""The ``mmrag`` script's entry point: run the command, clean up, and leave at once.

After a command that used Ray, torch and LanceDB, the interpreter's own teardown (freeing every
module and object, joining native thread pools) took ~2.3 s on a 2-core VM, after every
cleanup handler had run, Ray's shutdown and the Prefect server's stop included: 7 % of a
12-image ingest, for nothing.  So the script runs those handlers itself, flushes its output
and exits the process directly.  Everything the commands write is committed before they return
(LanceDB commits, atomic file renames), so nothing is lost by skipping the teardown.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import sys


def main() -> None:
    """``mmrag …``: the Typer app, then a fast exit with its status (an uncaught exception
    other than ``SystemExit`` propagates as usual, with its traceback).  SIGTERM (a scheduler
    or ``kill`` stopping the run) is an exit too, with status 143: the same handlers run, so
    Ray's processes and Prefect's server go with the command."""
    from mmrag.cli import app

    signal.signal(signal.SIGTERM, _terminated)
    try:
        app()
        code = 0
    except SystemExit as e:
        code = _status(e.code)
    fast_exit(code)


def _terminated(signum: int, _frame) -> None:
    raise SystemExit(128 + signum)


def _status(code: object) -> int:
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


def fast_exit(code: int) -> None:
    """Run the exit handlers (Ray shutdown, Prefect server stop, log flushes), flush standard
    streams, and end the process without the interpreter's teardown."""
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    os._exit(code)
