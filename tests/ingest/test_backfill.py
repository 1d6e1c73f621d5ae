"""Backfills: dump selection (fast), chunked runs, resume after SIGKILL, re-embedding (slow)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import lancedb
import numpy as np
import polars as pl
import pyarrow as pa
import pytest
from conftest import tables

from tasks.ingest import backfill
from tasks.ingest.backfill import BackfillError

# --- dump selection and bookkeeping (fast, no Ray) -------------------------------------------


def test_dates_in_both_spellings_and_nothing_else():
    assert backfill.parse_date("2024-02-29") == backfill.parse_date("20240229") == date(2024, 2, 29)
    for bad in ("2023-02-29", "2024-1-5", "24-01-05", "2024/01/05", "202401051", "", "x"):
        with pytest.raises(BackfillError, match="bad date"):
            backfill.parse_date(bad)


def test_range_is_inclusive_sorted_by_date_and_skips_other_names():
    names = ["20240103", "2024-01-01", "latest", "2024-13-01", "2024-01-02", "20231231", "tmp"]
    assert backfill.in_range(names, "2024-01-01", "20240102") == ["2024-01-01", "2024-01-02"]
    assert backfill.in_range(names, None, None) == ["20231231", "2024-01-01", "2024-01-02",
                                                    "20240103"]
    assert backfill.in_range(names, "2024-01-03", None) == ["20240103"]
    with pytest.raises(BackfillError, match="after"):
        backfill.in_range(names, "2024-01-03", "2024-01-01")


def test_root_selects_date_folders_only(tmp_path):
    for name in ("2024-05-02", "20240501", "2024-05-09", "incoming"):
        (tmp_path / name).mkdir()
    (tmp_path / "2024-05-03").write_text("a file, not a dump")
    root = os.path.realpath(tmp_path)
    got = backfill.resolve_dumps(None, str(tmp_path), "2024-05-01", "2024-05-08")
    assert got == [f"{root}/20240501", f"{root}/2024-05-02"]
    with pytest.raises(BackfillError, match="no dump folders"):
        backfill.resolve_dumps(None, str(tmp_path), "2025-01-01", None)


def test_explicit_roots_keep_order_and_must_exist(tmp_path):
    a, b = tmp_path / "b", tmp_path / "a"
    a.mkdir()
    b.mkdir()
    rel = os.path.relpath(a)
    assert backfill.resolve_dumps([str(a), str(b), rel], None, None, None) == [
        os.path.realpath(a), os.path.realpath(b)]
    with pytest.raises(BackfillError, match="not found: .*nope"):
        backfill.resolve_dumps([str(a), str(tmp_path / "nope")], None, None, None)
    with pytest.raises(BackfillError, match="not both"):
        backfill.resolve_dumps([str(a)], str(tmp_path), None, None)
    with pytest.raises(BackfillError, match="give --root"):
        backfill.resolve_dumps([str(a)], None, "2024-01-01", None)
    with pytest.raises(BackfillError, match="no dumps"):
        backfill.resolve_dumps([], None, None, None)


def test_chunks_are_bounded_and_ids_stable():
    dumps = [f"/d/{i}" for i in range(10)]
    assert [len(c) for c in backfill.chunked(dumps, 4)] == [4, 4, 2]
    assert [len(c) for c in backfill.chunked(dumps, 1, max_chunks=3)] == [4, 4, 2]
    assert sum(backfill.chunked(dumps, 3), []) == dumps
    ident = backfill.default_backfill_id(dumps, "m/a")
    assert ident == backfill.default_backfill_id(list(dumps), "m/a")
    assert ident != backfill.default_backfill_id(dumps, "m/b")
    assert ident != backfill.default_backfill_id(dumps[::-1], "m/a")


def test_ledger_roots_strip_rel_path(tmp_path):
    from schemas.tables import files_schema

    rows = [("/data/2024-01-01/images/a/x.jpg", "images/a/x.jpg"),
            ("/data/2024-01-01/y.png", "y.png"),
            ("s3://bucket/dumps/20240102/z.jpg", "z.jpg"),
            ("/odd/place.jpg", "../escape.jpg")]  # a path reject: no root can be derived
    table = pa.Table.from_pylist([
        {"source_uri": u, "rel_path": r, "file_name": "f", "size": 1, "mtime": 0.0,
         "image_id": None, "status": "rejected", "run_id": "r"} for u, r in rows],
        schema=files_schema())
    db = str(tmp_path / "db")
    lancedb.connect(db).create_table("files", table)
    assert backfill.ledger_roots(db) == ["/data/2024-01-01", "s3://bucket/dumps/20240102"]
    with pytest.raises(BackfillError, match="no 'files__x' ledger"):
        backfill.ledger_roots(db, "__x")
    with pytest.raises(BackfillError, match="no database"):
        backfill.ledger_roots(str(tmp_path / "none"))


def test_progress_rows_upsert_per_dump(tmp_path):
    db = str(tmp_path / "db")
    assert backfill.done_dumps(db, "bf-1") == set()
    base = {"backfill_id": "bf-1", "clip_model": "m/a"}
    backfill.record(db, base | {"dump": "/d/1", "status": "running"})
    backfill.record(db, base | {"dump": "/d/2", "status": "running"})
    backfill.record(db, base | {"dump": "/d/1", "status": "done", "seen": 3, "ingested": 3})
    backfill.record(db, base | {"backfill_id": "bf-2", "dump": "/d/2", "status": "done"})
    rows = backfill.progress_rows(db, "bf-1").sort("dump")
    assert rows.select("dump", "status", "ingested").rows() == [("/d/1", "done", 3),
                                                                 ("/d/2", "running", 0)]
    assert backfill.done_dumps(db, "bf-1") == {"/d/1"}
    assert (Path(db + ".locks") / "backfills.lock").exists()


def _cli(args: list[str], tmp_path: Path):
    from typer.testing import CliRunner

    from mmrag.cli import app

    return CliRunner().invoke(app, ["--db", str(tmp_path / "db"), "--profile", "tiny", *args])


@pytest.mark.parametrize(("args", "message"), [
    (["--root", "{root}", "--start", "2024-1-1"], "error: bad date '2024-1-1'"),
    (["--root", "{root}", "--start", "2030-01-01"], "error: no dump folders named"),
    (["--root", "{root}/nope"], "error: --root: SOURCE does not exist"),
    (["{root}/2024-01-01", "{root}/nope"], "error: dump folders not found: "),
    ([], "error: no dumps: give dump folders, --root, or --from-ledger"),
    (["--from-ledger"], "error: no database at "),
    (["{root}/2024-01-01", "--chunk-size", "0"], "error: --chunk-size must be at least 1"),
])
def test_cli_errors_are_one_line_and_exit_2(tmp_path, cache_dir, monkeypatch, args, message):
    monkeypatch.setenv("MMRAG_CACHE_DIR", str(cache_dir))
    (tmp_path / "2024-01-01").mkdir()
    r = _cli(["backfill", *[a.format(root=tmp_path) for a in args]], tmp_path)
    assert r.exit_code == 2, r.output
    assert r.output.strip().splitlines()[-1].startswith(message), r.output
    assert len(r.output.strip().splitlines()) == 1


def test_cli_backfill_is_registered_under_python_m(tmp_path, cache_dir):
    """``python -m mmrag.cli`` runs cli.py as ``__main__``: the command must be on that app
    and see its global options (here --db)."""
    env = os.environ | {"MMRAG_CACHE_DIR": str(cache_dir)}
    r = subprocess.run([sys.executable, "-m", "mmrag.cli", "--db", str(tmp_path / "elsewhere"),
                        "--profile", "tiny", "backfill", "--from-ledger"], env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip() == f"error: no database at {tmp_path / 'elsewhere'}: ingest first"


def test_failed_dump_is_recorded_and_retried_alone(tmp_path, settings, monkeypatch):
    """Dumps with nothing to embed need no Ray; a dump that fails is recorded, the others go
    on, the run ends in BackfillIncomplete, and the next run retries only that dump."""
    import flows.backfill as fb

    for name in ("2024-02-01", "2024-02-02", "2024-02-03"):
        (tmp_path / "root" / name).mkdir(parents=True)
    real, broken = fb.plan_source, os.path.realpath(tmp_path / "root" / "2024-02-02")

    def flaky(dump, *args, **kwargs):
        if dump == broken:
            raise OSError("disk went away")
        return real(dump, *args, **kwargs)

    monkeypatch.setattr(fb, "plan_source", flaky)
    with pytest.raises(backfill.BackfillIncomplete, match="1 dump.s. failed") as err:
        fb.backfill_flow.fn(root=str(tmp_path / "root"), chunk_size=2, settings=settings)
    assert err.value.summary["failed"] == [broken] and err.value.summary["dumps_done"] == 2
    rows = dict(backfill.progress_rows(settings.db).select("dump", "status").rows())
    assert rows[broken] == "failed" and sorted(rows.values()) == ["done", "done", "failed"]
    error = backfill.progress_rows(settings.db).filter(pl.col("dump") == broken)["error"][0]
    assert error == "OSError: disk went away"

    monkeypatch.setattr(fb, "plan_source", real)
    again = fb.backfill_flow.fn(root=str(tmp_path / "root"), chunk_size=2, settings=settings)
    assert (again["dumps_skipped"], again["dumps_done"], again["failed"]) == (2, 1, [])
    assert set(backfill.progress_rows(settings.db)["status"]) == {"done"}


# --- real backfills through Ray and LanceDB (slow) -------------------------------------------


def _dumps(root: Path, sizes: list[int], first_seed: int = 100) -> list[str]:
    from mmrag.samples.dump import generate_sample_dump

    out = []
    for i, n in enumerate(sizes):
        folder = root / f"2024-03-{i + 1:02d}"
        generate_sample_dump(folder, n, seed=first_seed + i)
        out.append(os.path.realpath(folder))
    return out


def _versions(db: str, suffix: str = "") -> dict:
    conn = lancedb.connect(db)
    return {n: conn.open_table(n + suffix).version for n in ("images", "files", "rejects")}


@pytest.mark.slow
def test_backfill_in_chunks_then_rerun_embeds_nothing(tmp_path, settings, ray_session):
    from flows.backfill import backfill_flow

    dumps = _dumps(tmp_path / "root", [6, 6, 6])
    (tmp_path / "root" / "not-a-dump").mkdir()
    s = backfill_flow.fn(root=str(tmp_path / "root"), chunk_size=2, settings=settings)
    assert (s["dumps"], s["chunks"], s["dumps_done"], s["failed"]) == (3, 2, 3, [])
    assert (s["seen"], s["ingested"], s["duplicates"], s["rejected"]) == (18, 18, 0, 0)
    t = tables(settings.db)
    assert t["images"].height == 18 and t["images"]["image_id"].n_unique() == 18
    assert t["files"].height == 18 and t["files"]["source_uri"].n_unique() == 18
    progress = backfill.progress_rows(settings.db, s["backfill_id"]).sort("dump")
    assert progress["dump"].to_list() == dumps and set(progress["status"]) == {"done"}
    assert progress["ingested"].to_list() == [6, 6, 6]

    versions = _versions(settings.db)
    again = backfill_flow.fn(root=str(tmp_path / "root"), chunk_size=2, settings=settings)
    assert again["backfill_id"] == s["backfill_id"]
    assert (again["dumps_skipped"], again["chunks"], again["ingested"]) == (3, 0, 0)
    # even under a new id (every dump planned again), the ledger says there is nothing to do
    other = backfill_flow.fn(roots=dumps[::-1], chunk_size=5, settings=settings)
    assert other["backfill_id"] != s["backfill_id"]
    assert (other["dumps_done"], other["seen"], other["ingested"]) == (3, 18, 0)
    assert _versions(settings.db) == versions, "a re-run must not write images/files/rejects"


SCRIPT = (
    "import sys\n"
    "from flows.backfill import backfill_flow\n"
    "from mmrag.settings import Settings\n"
    "backfill_flow.fn(root=sys.argv[1], chunk_size=2, settings=Settings())\n"
)


def _ledger_rows(db: str) -> int:
    try:
        return lancedb.connect(db).open_table("files").count_rows()
    except Exception:  # noqa: BLE001 - not created yet
        return 0


def _kill_when(proc, db: str, rows: int, timeout: float = 300) -> int:
    deadline = time.monotonic() + timeout
    while _ledger_rows(db) < rows and proc.poll() is None:
        assert time.monotonic() < deadline, "backfill made no progress"
        time.sleep(0.05)
    assert proc.poll() is None, "backfill finished before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return _ledger_rows(db)


@pytest.mark.slow
def test_killed_backfill_resumes_without_duplicates(tmp_path, settings, cache_dir, ray_session):
    from flows.backfill import backfill_flow

    sizes = [16, 64, 16]
    dumps = _dumps(tmp_path / "root", sizes, first_seed=200)
    env = os.environ | {
        "MMRAG_DB": settings.db, "MMRAG_PROFILE": "tiny", "MMRAG_CACHE_DIR": str(cache_dir),
        "MMRAG_WORK_DIR": settings.work_dir, "MMRAG_COMMIT_ROWS": "8", "MMRAG_BATCH_SIZE": "8",
        "MMRAG_DECODE_BATCH_SIZE": "4", "MMRAG_EMBED_ACTOR_CPUS": "0.5",
        "MMRAG_DECODE_CPUS": "0.25",
    }
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT, str(tmp_path / "root")], env=env,
                            start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    before = _kill_when(proc, settings.db, sizes[0] + 8)
    assert sizes[0] + 8 <= before < sum(sizes)
    status = dict(backfill.progress_rows(settings.db).select("dump", "status").rows())
    assert status[dumps[0]] == "done" and status.get(dumps[2]) != "done"

    s = backfill_flow.fn(root=str(tmp_path / "root"), chunk_size=2, settings=settings)
    assert s["dumps_skipped"] == 1 and s["dumps_done"] == 2
    assert s["ingested"] + s["duplicates"] == sum(sizes) - before, "re-embedded ledger files"
    t = tables(settings.db)
    assert t["files"].height == sum(sizes) and t["files"]["source_uri"].n_unique() == sum(sizes)
    assert t["images"].height == sum(sizes) and t["images"]["image_id"].n_unique() == sum(sizes)
    assert set(t["files"]["image_id"]) == set(t["images"]["image_id"])
    assert t["rejects"].height == 0
    progress = backfill.progress_rows(settings.db, s["backfill_id"])
    assert progress.height == 3 and set(progress["status"]) == {"done"}


@pytest.mark.slow
def test_reembedding_with_another_model_writes_its_own_tables(tmp_path, settings, cache_dir,
                                                              ray_session):
    from flows.backfill import backfill_flow
    from schemas.tables import table_suffix
    from tasks.models.clip import ensure_tiny_clip
    from tasks.query.retrieve import pin_images

    dumps = _dumps(tmp_path / "root", [5, 7], first_seed=300)
    first = backfill_flow.fn(roots=dumps, settings=settings)
    old_versions = _versions(settings.db)
    _, ckpt = ensure_tiny_clip(cache_dir, seed=1)
    other = settings.model_copy(update={"clip_model": "mmrag-tiny-clip", "clip_pretrained": ckpt})
    s = backfill_flow.fn(from_ledger=True, chunk_size=1, settings=other)

    label = "mmrag-tiny-clip/mmrag-tiny-clip-seed1.safetensors"
    suffix = table_suffix(label)
    assert suffix and s["clip_model"] == label and s["images_table"] == "images" + suffix
    assert s["backfill_id"] != first["backfill_id"] and (s["chunks"], s["ingested"]) == (2, 12)
    assert _versions(settings.db) == old_versions, "the first model's tables were written"
    conn = lancedb.connect(settings.db)
    old = conn.open_table("images").to_polars().collect().sort("image_id")
    new = conn.open_table("images" + suffix).to_polars().collect().sort("image_id")
    assert new["image_id"].to_list() == old["image_id"].to_list() and new.height == 12
    assert set(new["clip_model"]) == {label}
    assert conn.open_table("files" + suffix).count_rows() == 12
    cos = np.sum(np.stack(old["vector"].to_numpy()) * np.stack(new["vector"].to_numpy()), axis=1)
    assert (cos < 0.99).all(), "the new table holds the old model's vectors"
    assert pin_images(settings.db, 64, label).name == "images" + suffix
    rows = backfill.progress_rows(settings.db).group_by("clip_model").len().sort("clip_model")
    assert rows.rows() == [("mmrag-tiny-clip/mmrag-tiny-clip-seed0.safetensors", 2), (label, 2)]


@pytest.mark.slow
def test_backfills_apply_changes_and_keep_the_safety_valve(tmp_path, settings, ray_session):
    """A backfill over changed dumps applies metadata edits, deletions and moves as an ingest
    does (nothing embedded again), and refuses a dump that lost too many files: that dump is
    recorded failed with the one-line reason, its tables untouched, the other dump done."""
    from fault_checks import change_dump

    from flows.backfill import backfill_flow

    dumps = _dumps(tmp_path / "root", [12, 8], first_seed=400)  # 2 of 12 deleted: < 20%
    backfill_flow.fn(roots=dumps, settings=settings)
    what = change_dump(Path(dumps[0]))
    for path in sorted(Path(dumps[1]).rglob("*.JPG"))[:4]:
        path.unlink()
    with pytest.raises(backfill.BackfillIncomplete):
        backfill_flow.fn(roots=dumps, backfill_id="after-changes", settings=settings)
    rows = {r["dump"]: r for r in backfill.progress_rows(settings.db, "after-changes").to_dicts()}
    assert rows[dumps[0]]["status"] == "done" and rows[dumps[0]]["ingested"] == 0
    assert rows[dumps[1]]["status"] == "failed"
    assert "4 of the 8 files" in rows[dumps[1]]["error"] and "--allow-deletes" in rows[dumps[1]][
        "error"]
    t = tables(settings.db)
    deleted = set(t["files"].filter(pl.col("status") == "deleted")["source_uri"])
    assert deleted == {str(p) for p in (*what["deleted"], what["moved"][0])}
    cities = dict(t["images"].select("source_uri", "city").iter_rows())
    assert [cities[str(p)] for p in what["edited"]] == [f"Renamed City {i}" for i in range(3)]
    assert t["images"].height == 20 - 2 and str(what["moved"][1]) in cities
    assert rows[dumps[0]]["seen"] == 10
