"""Progress for long steps: a bar on a terminal, a log line every few seconds elsewhere, and,
inside a Prefect flow or task run, a progress artifact the UI shows while the step runs.

The artifact is best effort: a failing API call is logged once and never fails the step, and
outside a run (``task.fn()``, plain scripts) no Prefect call is made at all.
"""

from __future__ import annotations

import logging
import re
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

Logger = logging.Logger | logging.LoggerAdapter


@contextmanager
def progress(total: int, label: str, logger: Logger, every: float = 10.0,
             artifact: bool | None = None) -> Iterator[Callable[[int], None]]:
    """Yield ``advance(n)``; draws a rich bar when stderr is a terminal.

    ``artifact``: None = a Prefect progress artifact only inside a flow/task run; False = never.
    """
    tracker = (ArtifactProgress(total, label, logger)
               if total and artifact is not False and (artifact or in_prefect_run()) else None)
    with _local(total, label, logger, every) as local:
        if tracker is None:
            yield local
            return

        def advance(n: int) -> None:
            local(n)
            tracker.advance(n)

        yield advance
    tracker.finish()


@contextmanager
def _local(total: int, label: str, logger: Logger,
           every: float) -> Iterator[Callable[[int], None]]:
    """The terminal bar, or throttled log lines when nobody watches a terminal."""
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


def in_prefect_run() -> bool:
    """True inside a Prefect flow or task run (never imports Prefect when nothing else did)."""
    if "prefect" not in sys.modules:
        return False
    from prefect.context import FlowRunContext, TaskRunContext

    return FlowRunContext.get() is not None or TaskRunContext.get() is not None


def artifact_key(label: str) -> str:
    """Artifact keys allow lowercase letters, digits and dashes only."""
    return re.sub(r"[^a-z0-9-]+", "-", f"{label}-progress".lower()).strip("-")


class ArtifactProgress:
    """A Prefect progress artifact, updated at most every ``every`` seconds (one API call each)."""

    def __init__(self, total: int, label: str, logger: Logger, every: float = 2.0):
        self.total, self.label, self.logger, self.every = total, label, logger, every
        self.done, self.last, self.id = 0, time.monotonic(), None
        self._call("create", 0.0)

    def advance(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if now - self.last >= self.every or self.done >= self.total:
            self.last = now
            self._call("update", min(100.0, 100.0 * self.done / self.total))

    def finish(self) -> None:
        """The step returned: show it complete even if some inputs were skipped on the way."""
        self._call("update", 100.0, f"{self.label}: done ({self.done}/{self.total})")

    def _call(self, what: str, pct: float, description: str | None = None) -> None:
        from prefect.artifacts import create_progress_artifact, update_progress_artifact

        description = description or f"{self.label}: {self.done}/{self.total}"
        try:
            if what == "create":
                self.id = create_progress_artifact(pct, key=artifact_key(self.label),
                                                   description=description)
            elif self.id is not None:
                update_progress_artifact(self.id, pct, description=description)
        except Exception as e:  # noqa: BLE001 - observability must never fail the step
            self.logger.warning("progress artifact disabled: %s", e)
            self.id = None
