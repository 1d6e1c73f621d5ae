"""Start the embedding pipeline before the plan exists, so the CLIP actors load meanwhile.

A CLIP actor's start (a Ray worker process, Ray Data, torch and open_clip imports, the weights)
took 8-12 s on a 2-core VM, and Ray Data starts its actors only when a pipeline runs, which
used to be after planning, itself after Prefect's server was up: a serial chain while the CPUs
sat about half idle.  The ``mmrag ingest`` command now starts the pipeline as soon as Ray is up
(``flows.early.warm_up``), reading its input from a hand-off file that the flow's embedding
step fills with the plan (``feed``); the flow then consumes the stream as it would its own.
When nothing comes (no files left to embed, or the flow failed) the command cancels it.

One pending pipeline per process (a command runs one flow); a flow run by a Prefect worker
finds none and builds its pipeline after planning, as before.
"""

from __future__ import annotations

import logging
import queue
import shutil
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa

from tasks.io.cluster import wait_early
from tasks.models.clip import ClipSpec

log = logging.getLogger(__name__)

#: how long the pipeline's readers wait for a plan before giving up (the command cancels
#: sooner; this only bounds a process that died without cancelling)
WAIT_S = 900.0
#: how long a cancel waits for the pipeline to end (its actors hold CPUs another pipeline needs)
CANCEL_WAIT_S = 60.0
_DONE = object()


@dataclass
class Pending:
    """A pipeline running ahead of its plan; ``key`` says which runs may use it."""

    key: tuple
    handoff: Path
    chunks: queue.Queue = field(default_factory=lambda: queue.Queue(maxsize=4))
    stopped: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None

    def feed(self, plan_path: Path) -> None:
        """Hand the plan over (copy, then rename into place: readers never see half a file)."""
        tmp = self.handoff.with_name(self.handoff.name + ".tmp")
        shutil.copyfile(plan_path, tmp)
        tmp.replace(self.handoff)

    def stream(self) -> Iterator[pa.Table]:
        """The pipeline's chunks, in order; its error, if it failed, is raised here."""
        while True:
            item = self.chunks.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def cancel(self, wait_s: float = 0.0) -> bool:
        """End it without input (its readers return no rows); wait up to ``wait_s`` for it to
        finish and release its actors' CPUs.  True when it has finished."""
        self.stopped.set()
        Path(str(self.handoff) + ".cancel").touch()
        if self.thread is not None:
            self.thread.join(wait_s)
        return self.thread is None or not self.thread.is_alive()

    def close(self) -> None:
        """After the stream was consumed (or abandoned): stop, and remove the hand-off."""
        self.cancel()
        for path in (self.handoff, Path(str(self.handoff) + ".cancel")):
            path.unlink(missing_ok=True)

    def _pump(self, stream: Iterator[pa.Table]) -> None:
        try:
            for chunk in stream:
                self._put(chunk)
            self._put(_DONE)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, raised there
            self._put(e)

    def _put(self, item) -> None:
        while not self.stopped.is_set():
            try:
                self.chunks.put(item, timeout=0.5)
                return
            except queue.Full:
                continue


_pending: dict[str, Pending] = {}
_lock = threading.Lock()


def start(key: tuple, work_dir: str, expected: int, spec: ClipSpec, opts: dict) -> Pending:
    """Start the pipeline for about ``expected`` files (Ray must be up); ``opts`` as for
    ``embed_files``.  Replaces (cancels) one pending from an earlier call."""
    from tasks.ingest.pipeline import embed_when_planned

    handoff = Path(work_dir) / "prestart" / f"{uuid.uuid4().hex}.parquet"
    handoff.parent.mkdir(parents=True, exist_ok=True)
    pending = Pending(key, handoff)
    stream = embed_when_planned(str(handoff), expected, spec, wait_s=WAIT_S, **opts)
    pending.thread = threading.Thread(target=pending._pump, args=(stream,), daemon=True,
                                      name="ingest-prestart")
    pending.thread.start()
    with _lock:
        old, _pending["ingest"] = _pending.get("ingest"), pending
    if old:
        old.cancel(CANCEL_WAIT_S)
    return pending


def take(key: tuple) -> Pending | None:
    """The pending pipeline, if one was started for the same ``key`` (database, model,
    pipeline settings); it is the caller's from now on.  One started for another key is
    cancelled: its actors would hold the CPUs the caller's own pipeline needs.  Waits for an
    early start of Ray still under way (it may be about to start one)."""
    wait_early()
    with _lock:
        pending = _pending.pop("ingest", None)
    if pending is not None and pending.key != key:
        pending.cancel(CANCEL_WAIT_S)
        return None
    return pending


def cancel_pending() -> bool:
    """Cancel a pipeline nobody took (the flow had nothing to embed, or failed), once an early
    start of Ray still under way has finished."""
    wait_early()
    with _lock:
        pending = _pending.pop("ingest", None)
    if pending and not pending.cancel(CANCEL_WAIT_S):
        log.warning("the pre-started ingest pipeline did not stop within %.0f s", CANCEL_WAIT_S)
    return pending is not None
