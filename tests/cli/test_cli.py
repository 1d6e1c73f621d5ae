"""The ``mmrag`` command as a user runs it: real Prefect (ephemeral), real Ray, real LanceDB."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import tables

MMRAG = [sys.executable, "-m", "mmrag.cli"]


def _run(args, tmp_path, cache_dir, **env):
    full = os.environ | {"MMRAG_PROFILE": "tiny", "MMRAG_DB": str(tmp_path / "db"),
                         "MMRAG_CACHE_DIR": str(cache_dir), "MMRAG_WORK_DIR": str(tmp_path / "w"),
                         "MMRAG_EMBED_ACTOR_CPUS": "0.5", "MMRAG_DECODE_CPUS": "0.25"} | env
    return subprocess.run(MMRAG + args, env=full, capture_output=True, text=True, timeout=600,
                          cwd=tmp_path)


def test_missing_source_is_a_one_line_fatal_error(tmp_path, cache_dir):
    r = _run(["ingest", str(tmp_path / "nope")], tmp_path, cache_dir)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [f"error: SOURCE does not exist: {tmp_path / 'nope'}"]


def test_unwritable_db_is_a_one_line_fatal_error(tmp_path, cache_dir):
    (tmp_path / "dump").mkdir()
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    r = _run(["ingest", str(tmp_path / "dump")], tmp_path, cache_dir, MMRAG_DB=str(blocker / "db"))
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and re.match(r"error: cannot (open|write) LanceDB", lines[0])


def test_invalid_setting_is_reported(tmp_path, cache_dir):
    r = _run(["--batch-size", "0", "ingest", "."], tmp_path, cache_dir)
    assert r.returncode == 2 and "batch_size" in r.stderr


@pytest.mark.slow
def test_sample_dump_ingest_then_query(tmp_path, cache_dir):
    dump = tmp_path / "dump"
    r = _run(["sample-dump", str(dump), "--n", "12", "--with-bad"], tmp_path, cache_dir)
    assert r.returncode == 0, r.stderr
    assert (dump / "metadata.json").exists() and len(list(Path(dump).rglob("*.JPG"))) >= 12
    first = _run(["ingest", str(dump)], tmp_path, cache_dir)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "random-weight CLIP" in first.stdout and "rejected: decode=4" in first.stdout
    assert "Started a local Ray instance" in first.stderr  # started beside Prefect's server
    t = tables(str(tmp_path / "db"))
    assert t["images"].height >= 12 and t["rejects"].height > 0
    again = _run(["ingest", str(dump)], tmp_path, cache_dir)
    assert again.returncode == 0 and ", 0 read" in again.stdout, again.stderr[-3000:]
    assert "Ray" not in again.stderr, "a run with nothing new must not start Ray"
    queries = tmp_path / "q.jsonl"
    assert _run(["sample-queries", str(queries), "--dump", str(dump)], tmp_path,
                cache_dir).returncode == 0
    answered = _run(["query", str(queries), "--run-id", "cli", "--out", str(tmp_path / "out")],
                    tmp_path, cache_dir, MMRAG_MAX_NEW_TOKENS="4")
    assert answered.returncode == 0, answered.stderr[-3000:]
    assert "8 queries, 6 answered, errors: query=2" in answered.stdout
    out = list((tmp_path / "out" / "answers").glob("run_date=*/cli.parquet"))
    assert len(out) == 1 and str(out[0]) in answered.stdout.replace("\n", "")
    for run in (first, answered):  # quiet terminal: no deprecation notices, no engine chatter
        printed = run.stdout + run.stderr
        assert "Deprecation" not in printed and "Traceback" not in printed
        assert "Finished in state" not in printed and "summary: {" not in printed
        assert len(run.stderr.strip().splitlines()) <= 8, run.stderr


@pytest.mark.slow
def test_error_inside_a_flow_is_one_line_and_its_traceback_goes_to_the_log(tmp_path, cache_dir):
    queries = tmp_path / "q.jsonl"
    queries.write_text('{"query_id": "a", "text": "a street"}\n')
    r = _run(["query", str(queries), "--out", str(tmp_path / "out")], tmp_path, cache_dir)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and "images" in lines[-1], r.stderr
    assert [x for x in lines if "error" in x.lower()] == [lines[-1]], r.stderr
    assert "Traceback" not in r.stderr
    logs = list((tmp_path / "w" / "logs").glob("query-*.log"))
    assert len(logs) == 1 and "Traceback" in logs[0].read_text()
