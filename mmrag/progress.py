"""Progress for long steps: a bar on a terminal, a log line every few seconds elsewhere."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager


@contextmanager
def progress(total: int, label: str, logger: logging.Logger | logging.LoggerAdapter,
             every: float = 10.0) -> Iterator[Callable[[int], None]]:
    """Yield ``advance(n)``; draws a rich bar when stderr is a terminal."""
    if sys.stderr.isatty() and total:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

        with Progress("[progress.description]{task.description}", BarColumn(),
                      MofNCompleteColumn(), TimeRemainingColumn(), transient=True) as bar:
            task = bar.add_task(label, total=total)
            yield lambda n: bar.advance(task, n)
        return
    state = {"done": 0, "last": time.monotonic(), "start": time.monotonic()}

    def advance(n: int) -> None:
        state["done"] += n
        now = time.monotonic()
        if now - state["last"] >= every or state["done"] >= total:
            rate = state["done"] / max(now - state["start"], 1e-9)
            logger.info("%s: %d/%d (%.1f/s)", label, state["done"], total, rate)
            state["last"] = now

    yield advance
