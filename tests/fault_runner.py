"""Run a normal ingest or query with one fault injected from outside the production code.

Production code has no fault hooks.  This script, run as a subprocess, replaces one function
with a wrapper that acts on its N-th call (counted across processes in a file), then calls the
normal entry point (``ingest_flow.fn`` / ``query_flow.fn``) with ``Settings()`` from the
``MMRAG_*`` environment::

    python tests/fault_runner.py ingest SOURCE FAULT N
    python tests/fault_runner.py query QUERIES RUN_ID RUN_DATE FAULT N

Ingest faults: ``decode`` / ``embed`` (a Ray worker or CLIP actor SIGKILLs the driver after
finishing its N-th batch), ``write`` (the driver dies while LanceDB writes the N-th commit's
``images`` fragment), ``between`` (it dies after the N-th commit wrote ``images`` and
``rejects``, before the ``files`` ledger rows), ``change`` (it dies right after its N-th write
to any table: the ``sources`` row, rejects, ledger rows, images updates or deletions, index
refresh), ``close`` (it dies after the last chunk, before the run reconciled and closed the
dump), ``none``.  Query faults: ``generate`` (the engine replica kills the driver inside the
N-th generation batch), ``write`` (killed with a torn temp answers file), ``none``.
``actor_dies`` / ``decode_dies`` (the worker kills itself, the driver lives) are used in-process
by the tests through :func:`install`.

Wrappers that run inside Ray workers are pickled by value (this module is ``__main__`` or is
registered with ``register_pickle_by_value``), so ``STATE`` (driver pid, counter file, N)
travels with them.  With ``FAULT_GO`` set, the run waits for that file after start-up, so several
processes can start their work at the same moment.  The summary is printed as JSON on success.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import tasks.ingest.pipeline  # noqa: E402
import tasks.ingest.run  # noqa: E402
import tasks.query.generate  # noqa: E402
from tasks.io.images import decode_batch as _real_decode  # noqa: E402

STATE: dict = {"driver": os.getpid(), "counter": "", "n": 0, "poison": ""}


def nth_call() -> bool:
    """True on exactly the N-th call, counted across processes: each call appends one byte
    (O_APPEND is atomic) and the offset after its own write is its call number."""
    fd = os.open(STATE["counter"], os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        os.write(fd, b".")
        return os.lseek(fd, 0, os.SEEK_CUR) == STATE["n"]
    finally:
        os.close(fd)


def kill_driver() -> None:
    os.kill(STATE["driver"], signal.SIGKILL)
    time.sleep(5)  # the driver is gone; do not race it by returning a result


def decode_then_kill_driver(batch, **kw):
    out = _real_decode(batch, **kw)
    if nth_call():
        kill_driver()
    return out


def decode_dies(batch, **kw):
    if nth_call():
        os.kill(os.getpid(), signal.SIGKILL)
    return _real_decode(batch, **kw)


def decode_dies_on_poison(batch, **kw):
    """A decode worker that crashes on every batch holding the poisoned file (counted)."""
    if any(STATE["poison"] in str(uri) for uri in batch["source_uri"]):
        nth_call()
        os.kill(os.getpid(), signal.SIGKILL)
    return _real_decode(batch, **kw)


class EmbedThenKillDriver(tasks.ingest.pipeline.ClipEmbedder):
    def __call__(self, batch):
        out = super().__call__(batch)
        if nth_call():
            kill_driver()
        return out


class EmbedDies(tasks.ingest.pipeline.ClipEmbedder):
    """The CLIP actor's own process dies in the middle of its N-th batch."""

    def __call__(self, batch):
        if nth_call():
            os.kill(os.getpid(), signal.SIGKILL)
        return super().__call__(batch)


def _kill_when_new_file(folder: Path, before: set) -> None:
    while True:
        if folder.exists() and set(os.listdir(folder)) - before:
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(0.0005)


def _during_images_add(tables) -> None:
    """Die as soon as the new ``images`` data fragment appears, before the commit finishes."""
    add = tables.images.add
    data = Path(tables.images.uri.removeprefix("file://")) / "data"

    def killing_add(rows, *a, **kw):
        before = set(os.listdir(data)) if data.exists() else set()
        threading.Thread(target=_kill_when_new_file, args=(data, before), daemon=True).start()
        add(rows, *a, **kw)
        time.sleep(5)  # the watcher fires within milliseconds; never reach the ledger write
    tables.images.add = killing_add


def _before_ledger(_tables) -> None:
    def killing_upsert(files, table):
        os.kill(os.getpid(), signal.SIGKILL)
    tasks.ingest.run.store.upsert_files = killing_upsert


#: every function through which a run writes a table (besides ``images.add`` in commits)
_WRITES = ("upsert_source", "upsert_rejects", "upsert_files", "update_files", "delete_images",
           "update_images", "refresh_indexes")


def _kill_after_nth_write() -> None:
    store = tasks.ingest.run.store
    for name in _WRITES:
        def write(*args, _real=getattr(store, name), **kwargs):
            out = _real(*args, **kwargs)
            if nth_call():
                os.kill(os.getpid(), signal.SIGKILL)
            return out
        setattr(store, name, write)


def _kill_before_close() -> None:
    def close(*_args, **_kwargs):
        os.kill(os.getpid(), signal.SIGKILL)
    tasks.ingest.run.close_dump = close


def _on_nth_commit(arm) -> None:
    """Wrap ``commit_chunk``: on the N-th commit, ``arm(tables)`` plants the kill first."""
    real = tasks.ingest.run.commit_chunk

    def commit(tables, chunk, clip_label, run_id):
        if nth_call():
            arm(tables)
        return real(tables, chunk, clip_label, run_id)
    tasks.ingest.run.commit_chunk = commit


_RAY_FAULTS = {"decode": ("decode_batch", decode_then_kill_driver),
               "decode_dies": ("decode_batch", decode_dies),
               "decode_poison": ("decode_batch", decode_dies_on_poison),
               "embed": ("ClipEmbedder", EmbedThenKillDriver),
               "actor_dies": ("ClipEmbedder", EmbedDies)}


def install(fault: str, n: int, counter: str, poison: str = "", patch=setattr) -> None:
    """Plant ``fault`` on the N-th call (see the module docstring).  In-process callers pass
    ``monkeypatch.setattr`` as ``patch`` so the original is restored after the test."""
    STATE.update(driver=os.getpid(), counter=counter, n=n, poison=poison)
    if fault in _RAY_FAULTS:
        name, replacement = _RAY_FAULTS[fault]
        patch(tasks.ingest.pipeline, name, replacement)
    elif fault == "write":
        _on_nth_commit(_during_images_add)
    elif fault == "between":
        _on_nth_commit(_before_ledger)
    elif fault == "change":
        _kill_after_nth_write()
    elif fault == "close":
        _kill_before_close()
    elif fault != "none":
        raise SystemExit(f"unknown ingest fault {fault!r}")


def torn_answers_write(self, data) -> None:
    """``Path.write_bytes`` as the atomic writer calls it, except that the answers file's temp
    file gets half its bytes and the process dies (the run's work files are written normally)."""
    if not (self.parent.name.startswith("run_date=") and self.name.endswith(".tmp")
            and ".parquet." in self.name):  # not the answers file (e.g. the writability probe)
        return REAL_WRITE_BYTES(self, data)
    with open(self, "wb") as f:
        f.write(bytes(data)[: len(data) // 2])
        f.flush()
        os.fsync(f.fileno())
    os.kill(os.getpid(), signal.SIGKILL)


REAL_WRITE_BYTES = Path.write_bytes


class GenerateThenKillDriver(tasks.query.generate.Generator):
    """An engine replica (a Ray actor) that kills the driver inside its N-th batch."""

    def __call__(self, batch):
        if nth_call():
            kill_driver()
        return super().__call__(batch)


def install_query(fault: str, n: int, counter: str) -> None:
    STATE.update(driver=os.getpid(), counter=counter, n=n)
    if fault == "generate":  # the engine runs in a Ray actor: the replica kills the driver
        tasks.query.generate.Generator = GenerateThenKillDriver
    elif fault == "write":
        Path.write_bytes = torn_answers_write
    elif fault != "none":
        raise SystemExit(f"unknown query fault {fault!r}")


def _wait_for_go() -> None:
    go = os.environ.get("FAULT_GO")
    if not go:
        return
    Path(f"{go}.ready.{os.getpid()}").touch()
    while not Path(go).exists():
        time.sleep(0.01)


def main(argv: list[str]) -> None:
    from mmrag.settings import Settings

    settings = Settings()
    counter = os.environ.get("FAULT_COUNTER") or str(Path(settings.work_dir) / "fault-calls")
    Path(counter).parent.mkdir(parents=True, exist_ok=True)
    if argv[0] == "ingest":
        from flows.ingest import ingest_flow
        from tasks.io.cluster import RayConfig, init_ray

        source, fault, n = argv[1], argv[2], int(argv[3])
        install(fault, n, counter)
        init_ray(RayConfig(settings.ray_address, settings.ray_num_cpus,
                           settings.cache_dir + "/ray"))
        _wait_for_go()
        summary = ingest_flow.fn(source, settings)
    else:
        from flows.query import query_flow

        queries, run_id, run_date, fault, n = argv[1], argv[2], argv[3], argv[4], int(argv[5])
        install_query(fault, n, counter)
        _wait_for_go()
        summary = query_flow.fn(queries, settings, run_id, run_date)
    print(json.dumps(summary, default=str))


if __name__ == "__main__":
    main(sys.argv[1:])
