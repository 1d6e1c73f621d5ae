"""Faults in the query flow: killed mid-generation and mid-write, disk full, a read-only output
location, and a query running while two ingests write the same database."""

from __future__ import annotations

import io
import json
import os
import time
from pathlib import Path

import lancedb
import polars as pl
import pyarrow.parquet as pq
import pytest
from fault_checks import (
    assert_exactly,
    cli,
    expected_rows,
    fail_answers_writes,
    fill,
    make_fault_dump,
    one_line_error,
    run_runner,
    runner_env,
    start_runner,
    stop_ephemeral_prefect,  # noqa: F401 - autouse
    tmpfs,
)

from flows.config import clip_spec
from flows.ingest import ingest_flow
from flows.query import query_flow

pytestmark = pytest.mark.slow

DATE = "2026-02-03"
QUESTIONS = ["a quiet street", "is it safe here?", "trees and parked cars", "a tall building",
             "a busy road at night"]


@pytest.fixture(scope="module")
def world(tmp_path_factory, sample_dump, cache_dir, ray_session):
    """The session's 24-image sample dump ingested once; five text questions."""
    from mmrag.settings import Settings

    base = tmp_path_factory.mktemp("query-faults")
    settings = Settings(db=str(base / "db"), profile="tiny", cache_dir=str(cache_dir),
                        work_dir=str(base / "work"), out=str(base / "out"), max_new_tokens=4,
                        gen_batch_size=2, embed_actor_cpus=0.5, decode_cpus=0.25)
    ingest_flow.fn(str(sample_dump), settings)
    queries = base / "q.jsonl"
    queries.write_text("".join(json.dumps({"query_id": f"q{i}", "text": t, "top_k": 3}) + "\n"
                               for i, t in enumerate(QUESTIONS)))
    return base, settings, str(queries)


def _partition(out: str) -> Path:
    return Path(out) / "answers" / f"run_date={DATE}"


def _listing(out: str) -> tuple[list[str], list[str]]:
    """(visible parquet files, hidden temp files) of the test's partition."""
    names = sorted(os.listdir(_partition(out))) if _partition(out).exists() else []
    return [n for n in names if not n.startswith(".")], [n for n in names if n.startswith(".")]


def _complete(path: Path, answered: bool = True) -> pl.DataFrame:
    """A whole answers file: readable, one row per question with its hits (and answer)."""
    table = pl.from_arrow(pq.read_table(path))
    assert sorted(table["query_id"]) == [f"q{i}" for i in range(len(QUESTIONS))]
    assert table["error"].null_count() == len(QUESTIONS)
    assert table["retrieved"].list.len().to_list() == [3] * len(QUESTIONS)
    assert table["answer"].null_count() == (0 if answered else len(QUESTIONS))
    return table


def _killed_query(world, tmp_path, ray_session, run_id: str, fault: str, n: int,
                  engine: str = "transformers"):
    base, settings, queries = world
    env = runner_env(settings, ray_session, tmp_path / "calls", MMRAG_MAX_NEW_TOKENS="4",
                     MMRAG_GEN_BATCH_SIZE="2", MMRAG_ENGINE=engine)
    proc = run_runner(["query", queries, run_id, DATE, fault, str(n)], env)
    assert proc.returncode == -9, f"not killed ({proc.returncode}): {proc.stderr[-3000:]}"


@pytest.mark.slow
def test_killed_mid_generation_leaves_no_file_and_rerun_writes_one(world, tmp_path,
                                                                   ray_session):
    _, settings, queries = world
    _killed_query(world, tmp_path, ray_session, "gen-kill", "generate", 2)
    assert not any(n.startswith(("gen-kill", ".gen-kill")) for p in _listing(settings.out)
                   for n in p)
    query_flow.fn(queries, settings, "gen-kill", DATE)
    visible, _ = _listing(settings.out)
    assert [n for n in visible if n.startswith("gen-kill")] == ["gen-kill.parquet"]
    _complete(_partition(settings.out) / "gen-kill.parquet")


def test_killed_mid_write_keeps_the_previous_file(world, tmp_path, ray_session):
    """Retrieval-only runs (engine none): the write is what is under test."""
    from tasks.io.answers import read_answers

    _, settings, queries = world
    settings = settings.model_copy(update={"engine": "none"})
    query_flow.fn(queries, settings, "write-kill", DATE)
    final = _partition(settings.out) / "write-kill.parquet"
    before = final.read_bytes()
    _killed_query(world, tmp_path, ray_session, "write-kill", "write", 1, engine="none")
    visible, hidden = _listing(settings.out)
    assert "write-kill.parquet" in visible and final.read_bytes() == before
    torn = [n for n in hidden if n.startswith(".write-kill.parquet.")]
    assert len(torn) == 1, "the kill did not land inside the write"
    with pytest.raises(Exception):  # noqa: B017 - truncated Parquet: any reader error
        pq.read_table(_partition(settings.out) / torn[0])
    seen = read_answers(settings.out).filter(pl.col("run_id") == "write-kill").collect()
    assert seen.height == len(QUESTIONS)  # readers see the old file only, never the torn one
    query_flow.fn(queries, settings, "write-kill", DATE)
    visible, _ = _listing(settings.out)
    assert [n for n in visible if n.startswith("write-kill")] == ["write-kill.parquet"]
    again = _complete(final, answered=False)
    old = pl.from_arrow(pq.read_table(io.BytesIO(before)))
    assert again["created_at"].min() > old["created_at"].max()


def _previous_run(world, monkeypatch, out: Path, run_id: str) -> bytes:
    _, settings, queries = world
    ok = cli(["query", queries, "--run-id", run_id, "--run-date", DATE, "--engine", "none",
              "--out", str(out)], monkeypatch, **_env(settings))
    assert ok.exit_code == 0, ok.output[-3000:]
    return (_partition(str(out)) / f"{run_id}.parquet").read_bytes()


def _env(settings) -> dict:
    return {"MMRAG_PROFILE": "tiny", "MMRAG_DB": settings.db, "MMRAG_CACHE_DIR": settings.cache_dir,
            "MMRAG_WORK_DIR": settings.work_dir, "MMRAG_MAX_NEW_TOKENS": "4"}


def test_disk_full_writing_answers(world, tmp_path, monkeypatch):
    """ENOSPC (a full tmpfs; a patched write where mounting is not allowed): exit 2 with one
    ``error:`` line naming the file, the previous answers of the run byte-identical."""
    import errno

    _, settings, queries = world
    with tmpfs(tmp_path / "fs") as fs:
        out = fs or tmp_path / "out"
        before = _previous_run(world, monkeypatch, out, "full")
        if fs:
            fill(fs)
        else:
            error = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            fail_answers_writes(monkeypatch, error)
        failed = cli(["query", queries, "--run-id", "full", "--run-date", DATE, "--engine",
                      "none", "--out", str(out)], monkeypatch, **_env(settings))
        line = one_line_error(failed)
        assert "cannot write answers to" in line and "full.parquet" in line
        assert "No space left on device" in line
        assert _listing(str(out)) == (["full.parquet"], [])  # no temp file left behind
        assert (_partition(str(out)) / "full.parquet").read_bytes() == before


def test_read_only_output_location(world, tmp_path, monkeypatch):
    _, settings, queries = world
    with tmpfs(tmp_path / "fs") as fs:
        out = fs or tmp_path / "out"
        before = _previous_run(world, monkeypatch, out, "ro")
        if fs:
            import subprocess

            subprocess.run(["mount", "-o", "remount,ro", str(fs)], check=True)
        elif os.geteuid() != 0:
            _partition(str(out)).chmod(0o555)
        else:
            pytest.skip("root without mount: no way to make a folder unwritable")
        failed = cli(["query", queries, "--run-id", "ro", "--run-date", DATE, "--engine", "none",
                      "--out", str(out)], monkeypatch, **_env(settings))
        line = one_line_error(failed)
        assert "cannot write answers under" in line  # refused before any retrieval
        assert "Read-only file system" in line or "Permission denied" in line
        assert _listing(str(out)) == (["ro.parquet"], [])
        assert (_partition(str(out)) / "ro.parquet").read_bytes() == before


@pytest.mark.slow
@pytest.mark.extended  # ~51 s; tests/ingest/test_concurrent_writers.py races two ingests by default
def test_two_ingests_and_a_query_at_once(tmp_path, cache_dir, ray_session):
    """Two ingests of the same new files and a query, released together: no duplicates, the
    tables equal one ingest's, and the query's table_version reproduces what it retrieved."""
    from mmrag.samples.dump import generate_sample_dump
    from mmrag.settings import Settings
    from tasks.models.clip import load_clip, model_shape
    from tasks.query.retrieve import embed_queries, pin_images, search_all

    dump = make_fault_dump(tmp_path / "dump", 12, seed=21)
    settings = Settings(db=str(tmp_path / "db"), profile="tiny", cache_dir=str(cache_dir),
                        work_dir=str(tmp_path / "work"), out=str(tmp_path / "out"),
                        commit_rows=8, embed_actor_cpus=0.25, decode_cpus=0.25)
    ingest_flow.fn(str(dump), settings)
    start_version = lancedb.connect(settings.db).open_table("images").version
    generate_sample_dump(dump / "later", 24, seed=22, size=(320, 240), metadata=False)
    queries = tmp_path / "q.jsonl"
    queries.write_text("".join(json.dumps({"query_id": f"q{i}", "text": t, "top_k": 4}) + "\n"
                               for i, t in enumerate(QUESTIONS)))
    env = runner_env(settings, ray_session, tmp_path / "calls", MMRAG_COMMIT_ROWS="4",
                     MMRAG_EMBED_ACTOR_CPUS="0.25", MMRAG_ENGINE="none")
    go_ingest, go_query = tmp_path / "go-ingest", tmp_path / "go-query"
    procs = [start_runner(["ingest", str(dump), "none", "0"], env | {"FAULT_GO": str(go_ingest)})
             for _ in range(2)]
    procs.append(start_runner(["query", str(queries), "during", DATE, "none", "0"],
                              env | {"FAULT_GO": str(go_query)}))
    _wait_ready([go_ingest, go_ingest, go_query], procs)
    ledger = lancedb.connect(settings.db).open_table("files")
    before = ledger.count_rows()
    go_ingest.touch()
    while ledger.count_rows() == before:  # the query starts once the ingests are committing
        assert all(p.poll() is None for p in procs[:2]), "an ingest ended before committing"
        time.sleep(0.02)
        ledger.checkout_latest()
    go_query.touch()
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]

    assert_exactly(settings.db, expected_rows(dump))
    answers = pl.read_parquet(_partition(settings.out) / "during.parquet")
    version = answers["table_version"].unique().to_list()
    assert len(version) == 1 and version[0] > start_version  # pinned after ingest commits
    table = lancedb.connect(settings.db).open_table("images")
    assert version[0] in {v["version"] for v in table.list_versions()}
    spec = clip_spec(settings)
    pinned = pin_images(settings.db, model_shape(spec)[0], spec.label, version=version[0])
    plan = pl.read_parquet(Path(settings.work_dir) / "query-during" / "queries.parquet")
    vectors, errors = embed_queries(plan, load_clip(spec), settings.max_image_pixels)
    redo = search_all(pinned, plan, vectors, errors, {})
    for i, row in enumerate(answers.sort("query_id").iter_rows(named=True)):
        assert [h["image_id"] for h in row["retrieved"]] == [h["image_id"] for h in redo.get(i, [])]
    stored = set(pinned.table.to_arrow()["image_id"].to_pylist())
    assert {h["image_id"] for r in answers["retrieved"] for h in r} <= stored


def _wait_ready(gates: list[Path], procs: list, timeout: float = 240) -> None:
    """Until every process has started up and waits at its gate file."""
    deadline = time.monotonic() + timeout
    ready = sum(len(list(g.parent.glob(g.name + ".ready.*"))) for g in set(gates))
    while ready < len(procs):
        assert all(p.poll() is None for p in procs), procs[0].communicate()[1][-3000:]
        assert time.monotonic() < deadline, "runs never got ready"
        time.sleep(0.05)
        ready = sum(len(list(g.parent.glob(g.name + ".ready.*"))) for g in set(gates))
