"""What a flow prints on the terminal: its own progress and warnings, not Prefect's engine
chatter, and never the traceback of an error the CLI reports in one line.

Everything still reaches the run's log file (``MMRAG_WORK_DIR/logs/``) and, through Prefect's
own handler, the Prefect run log; only the terminal is filtered.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path

#: Prefect's per-run engine lines, and the flows' summary dicts (kept for the Prefect run
#: log): the command prints its own summary instead.
_CHATTER = re.compile(r"^(Beginning (flow|subflow) run|View at |Finished in state |Created task "
                      r"run|Executing |Submitting |Stopping temporary server|\w+ summary: \{)")
_RUN_LOGGERS = ("prefect.flow_runs", "prefect.task_runs")


class TerminalFilter(logging.Filter):
    """Drops engine chatter and run errors (the CLI prints those as one ``error:`` line)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith("prefect"):
            return True
        if record.levelno >= logging.ERROR and record.name.startswith(_RUN_LOGGERS):
            return False
        message = record.getMessage()
        if _CHATTER.match(message):
            return False
        if "\n" in message and record.name == "prefect":  # the server's how-to link
            record.msg, record.args = message.split("\n", 1)[0], ()
        return True


def _console_handlers() -> list[logging.Handler]:
    """Handlers that write to the terminal (Prefect's console handler sits on the root)."""
    import prefect.logging  # noqa: F401 - sets up Prefect's logging configuration

    return [h for h in logging.getLogger().handlers
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)]


@contextlib.contextmanager
def quiet(work_dir: str, name: str) -> Iterator[Path]:
    """Filter the terminal for the rest of the process (the Prefect server still logs when it
    stops at exit) and keep the full log of this command in a file."""
    logs = Path(work_dir) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    path = logs / f"{name}-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}.log"
    file_handler = logging.FileHandler(path, encoding="utf-8")
    file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    for handler in _console_handlers():
        if not any(isinstance(f, TerminalFilter) for f in handler.filters):
            handler.addFilter(TerminalFilter())
    root = logging.getLogger()
    root.addHandler(file_handler)
    try:
        yield path
    finally:
        root.removeHandler(file_handler)
        file_handler.close()
