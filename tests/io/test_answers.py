"""The answers Parquet dataset: contract, atomic replace, path safety, Polars/DuckDB reads."""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from schemas.answers import ANSWER_SCHEMA, SCHEMA_VERSION
from tasks.io.answers import answers_path, read_answers, write_answers

DATE = "2024-05-01"


def _row(query_id: str = "q00001", answer: str = "It is [1].") -> dict:
    hits = [{"rank": r, "image_id": f"img{r}", "source_uri": f"/d/{r}.jpg", "city": "Boston",
             "lat": 42.3, "lon": -71.1, "caption": "a street", "similarity": 0.5,
             "safer": 5.5, "vector": [0.1, 0.2], "_distance": 0.4} for r in (1, 2)]
    return {"run_id": "run-1", "query_id": query_id, "query_text": "safe?", "mode": "text",
            "top_k": 2, "retrieved": hits, "prompt": "p", "prompt_images": ["img1", "img2"],
            "generator": "none", "answer": answer, "citations": [1],
            "created_at": datetime(2024, 5, 1, 12, tzinfo=UTC)}


def _visible(tmp_path) -> list[str]:
    return sorted(p.name for p in (tmp_path / "answers" / f"run_date={DATE}").iterdir())


def test_round_trip_with_polars(tmp_path):
    path = write_answers([_row(), {"query_id": "q00002", "error": "bad row"}], str(tmp_path),
                         DATE, "run-1")
    assert path == answers_path(str(tmp_path), DATE, "run-1")
    assert path.endswith(f"answers/run_date={DATE}/run-1.parquet")
    assert pq.read_schema(path).metadata[b"mmrag.schema_version"] == SCHEMA_VERSION.encode()
    assert pq.read_schema(path).remove_metadata().equals(ANSWER_SCHEMA.remove_metadata())
    assert pq.ParquetFile(path).metadata.row_group(0).column(0).compression == "ZSTD"
    df = read_answers(str(tmp_path)).collect()
    assert df.height == 2 and df.schema["run_date"] == pl.Date
    assert df["run_date"].cast(pl.String).to_list() == [DATE, DATE]
    first, second = df.sort("query_id").to_dicts()
    assert first["retrieved"][1]["image_id"] == "img2" and first["retrieved"][0]["safer"] == 5.5
    assert "vector" not in first["retrieved"][0]  # search extras are not part of the contract
    assert first["citations"] == [1] and first["created_at"].tzinfo is not None
    assert second["retrieved"] is None and second["answer"] is None
    assert second["error"] == "bad row"


def test_round_trip_with_duckdb(tmp_path):
    duckdb = pytest.importorskip("duckdb")
    write_answers([_row()], str(tmp_path), DATE, "run-1")
    write_answers([_row("q9")], str(tmp_path), "2024-05-02", "run-2")
    (tmp_path / "answers" / f"run_date={DATE}" / ".run-1.parquet.dead.tmp").write_bytes(b"x")
    glob = f"{tmp_path}/answers/**/*.parquet"
    rows = duckdb.sql(
        f"SELECT run_date, query_id, retrieved[2].image_id AS second, len(retrieved) AS n "
        f"FROM read_parquet('{glob}', hive_partitioning = true) ORDER BY query_id"
    ).fetchall()
    assert [(str(d), q, s, n) for d, q, s, n in rows] == [
        (DATE, "q00001", "img2", 2), ("2024-05-02", "q9", "img2", 2)]


def test_rewrite_replaces_the_run(tmp_path):
    write_answers([_row("a"), _row("b")], str(tmp_path), DATE, "run-1")
    write_answers([_row("c", answer="new")], str(tmp_path), DATE, "run-1")
    assert _visible(tmp_path) == ["run-1.parquet"]
    df = read_answers(str(tmp_path)).collect()
    assert df["query_id"].to_list() == ["c"] and df["answer"].to_list() == ["new"]


def test_crash_mid_write_keeps_the_previous_file(tmp_path, monkeypatch):
    path = write_answers([_row("old")], str(tmp_path), DATE, "run-1")
    before = Path(path).read_bytes()

    def crash(self, data):
        with open(self, "wb") as f:
            f.write(bytes(data)[: len(data) // 2])
        assert self.name.startswith(".")  # hidden while incomplete
        raise OSError("disk full")

    monkeypatch.setattr(Path, "write_bytes", crash)
    with pytest.raises(OSError, match="disk full"):
        write_answers([_row("new")], str(tmp_path), DATE, "run-1")
    assert Path(path).read_bytes() == before
    assert _visible(tmp_path) == ["run-1.parquet"]  # the temp file was removed


def test_leftover_temp_files_are_invisible_to_readers(tmp_path):
    write_answers([_row()], str(tmp_path), DATE, "run-1")
    part = tmp_path / "answers" / f"run_date={DATE}"
    (part / ".run-2.parquet.0123.tmp").write_bytes(b"PAR1 torn")  # as a killed writer leaves it
    (part / "_hidden.parquet").write_bytes(b"PAR1 torn")
    assert read_answers(str(tmp_path)).collect()["query_id"].to_list() == ["q00001"]


def test_older_schema_files_still_read(tmp_path):
    part = tmp_path / "answers" / "run_date=2023-01-01"
    part.mkdir(parents=True)
    pq.write_table(pa.table({"run_id": ["old"], "query_id": ["q1"], "answer": ["hi"]}),
                   part / "old.parquet")
    write_answers([_row()], str(tmp_path), DATE, "run-1")
    df = read_answers(str(tmp_path)).sort("run_date").collect()
    assert df["answer"].to_list() == ["hi", "It is [1]."] and df["prompt"][0] is None


def test_empty_output_dir_reads_as_empty_frame(tmp_path):
    df = read_answers(str(tmp_path / "nothing")).collect()
    assert df.height == 0 and "run_date" in df.columns and "retrieved" in df.columns


def test_zero_rows_still_write_a_complete_file(tmp_path):
    path = write_answers([], str(tmp_path), DATE, "run-1")
    assert pq.read_table(path).num_rows == 0


@pytest.mark.parametrize("run_id", ["../x", "a/b", "..", ".", ".hidden", "_x", "a\\b", "",
                                    "a..b", "x\x00", "a b", None])
def test_bad_run_id_is_rejected(tmp_path, run_id):
    with pytest.raises(ValueError, match="run_id"):
        write_answers([_row()], str(tmp_path), DATE, run_id)
    assert not (tmp_path / "answers").exists()


@pytest.mark.parametrize("run_date", ["2024-5-1", "2024-13-01", "2024-02-30", "../2024-05-01",
                                      "2024-05-01/..", "20240501", "", None])
def test_bad_run_date_is_rejected(tmp_path, run_date):
    with pytest.raises(ValueError, match="run_date"):
        write_answers([_row()], str(tmp_path), run_date, "run-1")


def test_unknown_keys_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="answr"):
        write_answers([{"answr": "typo"}], str(tmp_path), DATE, "run-1")


def test_object_storage_paths():
    """s3:// roots keep their scheme (written through pyarrow; tests/test_s3.py round-trips)."""
    want = f"s3://bkt/out/answers/run_date={DATE}/r1.parquet"
    assert answers_path("s3://bkt/out/", DATE, "r1") == want
    with pytest.raises(ValueError, match="bucket"):
        answers_path("s3://", DATE, "r1")
    with pytest.raises(ValueError, match="run_id"):
        answers_path("s3://bkt/out", DATE, "../r1")


def test_a_killed_writers_old_temp_file_is_swept_on_the_next_write(tmp_path):
    import time

    part = tmp_path / "answers" / f"run_date={DATE}"
    part.mkdir(parents=True)
    old = part / ".run-1.parquet.dead.tmp"
    fresh = part / ".run-1.parquet.live.tmp"
    other = part / ".run-2.parquet.dead.tmp"
    for f in (old, fresh, other):
        f.write_bytes(b"PAR1 torn")
    hours_ago = time.time() - 2 * 3600
    os.utime(old, (hours_ago, hours_ago))
    os.utime(other, (hours_ago, hours_ago))
    write_answers([_row()], str(tmp_path), DATE, "run-1")
    assert not old.exists()  # this run's stale temp file is gone
    assert fresh.exists() and other.exists()  # a live writer's, and another run's, are kept


def test_unwritable_output_fails_before_any_work(tmp_path):
    from tasks.io.answers import OutputError, check_writable

    check_writable(str(tmp_path / "out"), DATE)
    part = tmp_path / "out" / "answers" / f"run_date={DATE}"
    assert part.is_dir() and list(part.iterdir()) == []  # the probe is gone
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(OutputError, match="cannot write answers under"):
        check_writable(str(blocker / "out"), DATE)
    check_writable("s3://bucket/out", DATE)  # object stores: checked by the upload itself
    with pytest.raises(ValueError, match="run_date"):
        check_writable(str(tmp_path / "out"), "yesterday")
