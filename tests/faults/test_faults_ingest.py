"""Faults during ingest, injected at chosen points, then the tables checked row by row.

The killed runs are ``tests/fault_runner.py`` in a subprocess whose driver joins the session's
Ray: it is SIGKILLed during decode, during embedding, while LanceDB writes ``images``, between
``images`` and the ``files`` ledger, before the run is closed, or after any write of a run that
applies a changed dump (metadata edits, deleted and moved files).  Ray workers and CLIP actors
that die mid-batch are injected in-process.  After every fault, a normal re-run must leave
exactly the rows a clean ingest makes (``fault_checks.expected_rows``, derived from the dump's
bytes, or a clean ingest of the changed dump).
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

import lancedb
import pytest
from fault_checks import (
    COMMIT_ROWS,
    PLAN_REJECTS,
    assert_consistent,
    assert_exactly,
    assert_same_as_clean,
    change_dump,
    cli,
    expected_rows,
    fill,
    make_fault_dump,
    one_line_error,
    run_runner,
    runner_env,
    stop_ephemeral_prefect,  # noqa: F401 - autouse
    tmpfs,
)

from flows.ingest import ingest_flow

pytestmark = pytest.mark.slow

N_GOOD = 16
N_FILES = N_GOOD + 2 + PLAN_REJECTS  # + a duplicate copy, a truncated file, 2 non-UTF-8 names


@pytest.fixture(scope="module")
def fault_dump(tmp_path_factory) -> Path:
    return make_fault_dump(tmp_path_factory.mktemp("fault-dump") / "dump", N_GOOD)


def kill(fault: str, n: int, dump, tmp_path, settings, ray_session) -> dict:
    """Run the faulty ingest; it must die by SIGKILL and leave consistent tables behind."""
    env = runner_env(settings, ray_session, tmp_path / "calls")
    proc = run_runner(["ingest", str(dump), fault, str(n)], env)
    assert proc.returncode == -9, f"not killed ({proc.returncode}): {proc.stderr[-3000:]}"
    killed = assert_consistent(settings.db)
    assert killed["files"].height < N_FILES
    return killed


def resume(dump, settings, killed: dict) -> None:
    """A normal re-run redoes exactly the files without a ledger row, and nothing else."""
    again = ingest_flow.fn(str(dump), settings)
    assert_exactly(settings.db, expected_rows(dump))
    assert again["unchanged"] == killed["files"].height
    assert again["todo"] == N_FILES - killed["files"].height


def test_killed_between_images_and_ledger(fault_dump, tmp_path, settings, ray_session):
    """The 2nd commit stored its images but not their ledger rows: the re-run adopts them."""
    killed = kill("between", 2, fault_dump, tmp_path, settings, ray_session)
    # exactly the first commit's ledger rows, and the names rejected while planning
    assert killed["files"].height == COMMIT_ROWS + PLAN_REJECTS
    unledgered = set(killed["images"]["image_id"]) - set(killed["files"]["image_id"])
    assert unledgered, "the kill did not land between the images and files writes"
    resume(fault_dump, settings, killed)


@pytest.mark.slow
@pytest.mark.parametrize(("fault", "n"), [("decode", 4), ("embed", 2)])
def test_killed_inside_a_ray_stage(fault, n, fault_dump, tmp_path, settings, ray_session):
    """A decode task or a CLIP actor SIGKILLs the driver after finishing its N-th batch."""
    killed = kill(fault, n, fault_dump, tmp_path, settings, ray_session)
    resume(fault_dump, settings, killed)


@pytest.mark.slow
def test_killed_during_the_lancedb_write(fault_dump, tmp_path, settings, ray_session):
    """Killed while the 2nd commit's ``images`` fragment was on disk but not committed."""
    killed = kill("write", 2, fault_dump, tmp_path, settings, ray_session)
    assert killed["files"].height == COMMIT_ROWS + PLAN_REJECTS
    assert set(killed["images"]["image_id"]) == set(killed["files"]["image_id"].drop_nulls())
    images = lancedb.connect(settings.db).open_table("images")
    committed = images.stats()["fragment_stats"]["num_fragments"]
    on_disk = os.listdir(Path(settings.db) / "images.lance" / "data")
    assert len(on_disk) == committed + 1, "no torn fragment: the kill missed the write"
    resume(fault_dump, settings, killed)


def _plant(fault: str, tmp_path, ray_session, monkeypatch, n: int = 0, poison: str = ""):
    import fault_runner

    ray_session.cloudpickle.register_pickle_by_value(fault_runner)  # workers get the wrapper
    fault_runner.install(fault, n, str(tmp_path / "calls"), poison, patch=monkeypatch.setattr)
    return tmp_path / "calls"


@pytest.mark.slow
def test_clip_actor_dies_mid_batch_is_retried(fault_dump, tmp_path, settings, ray_session,
                                              monkeypatch):
    """Ray restarts the actor and re-runs its batch: one run, exactly the expected rows."""
    calls = _plant("actor_dies", tmp_path, ray_session, monkeypatch, n=2)
    summary = ingest_flow.fn(str(fault_dump), settings)
    assert calls.stat().st_size > 2  # the 2nd call killed its actor; later calls ran anyway
    assert (summary["seen"], summary["todo"]) == (N_FILES, N_FILES - PLAN_REJECTS)
    assert summary["ingested"] == N_GOOD and summary["rejected"] == {"path": 2, "decode": 1}
    assert_exactly(settings.db, expected_rows(fault_dump))


def test_input_that_keeps_killing_its_worker_fails_cleanly(fault_dump, tmp_path, settings,
                                                           ray_session, monkeypatch):
    """A file that crashes its decode worker every time: the batch is retried a bounded number
    of times, the run stops with a readable error, and the next run completes."""
    from tasks.ingest.pipeline import BATCH_RETRIES, PipelineError

    poison = sorted(p.name for p in fault_dump.rglob("*.JPG"))[5]
    calls = _plant("decode_poison", tmp_path, ray_session, monkeypatch, poison=poison)
    with pytest.raises(PipelineError, match=f"same batch {BATCH_RETRIES + 1} times"):
        ingest_flow.fn(str(fault_dump), settings)
    assert calls.stat().st_size == BATCH_RETRIES + 1
    failed = assert_consistent(settings.db)
    assert not any(poison in u for u in failed["files"]["source_uri"])
    monkeypatch.undo()
    resume(fault_dump, settings, failed)


def test_disk_full_mid_ingest(tmp_path, settings, ray_session, monkeypatch):
    """The disk fills up after the first commit (a real full tmpfs where mounting is allowed,
    else a write that raises ENOSPC): ``mmrag ingest`` exits 2 with one ``error:`` line and
    the tables keep exactly what the first commit wrote (re-runs are proven above)."""
    import tasks.ingest.run

    dump = make_fault_dump(tmp_path / "dump", N_GOOD)
    with tmpfs(tmp_path / "fs") as fs:
        db = str((fs or tmp_path) / "db")
        seen, real = {}, tasks.ingest.run.commit_chunk

        def commit(tables_, chunk, clip_label, run_id):
            if "before" not in seen and tables_.files.count_rows() > PLAN_REJECTS:
                seen["before"] = (assert_consistent(db), _versions(db))
                if fs:
                    fill(fs)
                else:
                    monkeypatch.setattr(tables_.images, "add", _no_space)
            return real(tables_, chunk, clip_label, run_id)

        monkeypatch.setattr(tasks.ingest.run, "commit_chunk", commit)
        failed = cli(["ingest", str(dump)], monkeypatch, **_cli_env(settings, db))
        line = one_line_error(failed)
        assert f"cannot write LanceDB at {db}" in line and "No space left on device" in line
        before, versions = seen["before"]
        assert _versions(db) == versions  # no commit, not even a partial one
        after = assert_consistent(db)
        for name in ("images", "files", "rejects"):
            assert after[name].sort(after[name].columns[0]).equals(
                before[name].sort(before[name].columns[0])), name
        assert after["files"].height == COMMIT_ROWS + PLAN_REJECTS


def _no_space(*_args, **_kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _versions(db: str) -> dict:
    conn = lancedb.connect(db)
    return {n: conn.open_table(n).version for n in ("images", "files", "rejects")}


def _cli_env(settings, db: str) -> dict:
    return {"MMRAG_PROFILE": "tiny", "MMRAG_DB": db, "MMRAG_CACHE_DIR": settings.cache_dir,
            "MMRAG_WORK_DIR": settings.work_dir, "MMRAG_COMMIT_ROWS": str(COMMIT_ROWS),
            "MMRAG_BATCH_SIZE": "8", "MMRAG_DECODE_BATCH_SIZE": "4",
            "MMRAG_EMBED_ACTOR_CPUS": "0.5", "MMRAG_DECODE_CPUS": "0.25"}


@pytest.fixture(scope="module")
def changed(tmp_path_factory, cache_dir, ray_session):
    """A sample dump ingested once (the template database), then changed as the issue says
    (metadata of 3 images, 2 files deleted, 1 moved), and a clean ingest of the changed dump."""
    from mmrag.samples.dump import generate_sample_dump
    from mmrag.settings import Settings

    base = tmp_path_factory.mktemp("changed")
    dump = base / "dump"
    generate_sample_dump(dump, 12, seed=21, size=(320, 240))
    template = Settings(db=str(base / "template"), profile="tiny", cache_dir=str(cache_dir),
                        work_dir=str(base / "work"), batch_size=8, decode_batch_size=4,
                        commit_rows=COMMIT_ROWS, embed_actor_cpus=0.5, decode_cpus=0.25)
    ingest_flow.fn(str(dump), template)
    what = change_dump(dump)
    clean = template.model_copy(update={"db": str(base / "clean")})
    ingest_flow.fn(str(dump), clean)
    gone = {str(p) for p in (*what["deleted"], what["moved"][0])}
    return dump, template, clean, gone


def test_killed_after_any_write_of_a_change_run(changed, tmp_path, ray_session):
    """The change run (no embedding) is SIGKILLed right after its 1st, 2nd, … write until one
    run completes; after each kill, a normal re-run ends exactly where a clean ingest does."""
    dump, template, clean, gone = changed
    kills = 0
    for n in range(1, 40):
        settings = template.model_copy(update={"db": str(tmp_path / f"db{n}")})
        shutil.copytree(template.db, settings.db)
        env = runner_env(settings, ray_session, tmp_path / f"calls{n}")
        proc = run_runner(["ingest", str(dump), "change", str(n)], env)
        if proc.returncode == 0:
            break
        assert proc.returncode == -9, f"not killed ({proc.returncode}): {proc.stderr[-3000:]}"
        kills += 1
        assert_consistent(settings.db)
        again = ingest_flow.fn(str(dump), settings)
        assert again["todo"] == 0, again  # nothing was embedded again
        assert_same_as_clean(settings.db, clean.db, gone)
    # sources running, rejects, escapes, moved rows, deletions, images deleted, images updated,
    # ledger fixes, sources running, indexes, sources done: 11 writes, 11 kills (measured)
    assert kills >= 10, f"only {kills} kill points: the change run's writes were not all reached"
    assert_same_as_clean(settings.db, clean.db, gone)  # the run that was not killed


def test_killed_before_the_run_is_closed(fault_dump, tmp_path, settings, ray_session):
    """Every chunk committed, the run killed before it reconciled and closed the dump: the
    ledger looks complete, yet the re-run is no no-op: it finishes the reconciliation."""
    env = runner_env(settings, ray_session, tmp_path / "calls")
    proc = run_runner(["ingest", str(fault_dump), "close", "1"], env)
    assert proc.returncode == -9, f"not killed ({proc.returncode}): {proc.stderr[-3000:]}"
    killed = assert_consistent(settings.db)
    assert killed["files"].height == N_FILES
    assert _source_status(settings.db) == "running"
    again = ingest_flow.fn(str(fault_dump), settings)
    assert (again["todo"], again["unchanged"]) == (0, N_FILES)
    assert_exactly(settings.db, expected_rows(fault_dump))
    assert _source_status(settings.db) == "done"
    assert ingest_flow.fn(str(fault_dump), settings)["todo"] == 0


def _source_status(db: str) -> str:
    [status] = lancedb.connect(db).open_table("sources").to_polars().collect()["status"]
    return status
