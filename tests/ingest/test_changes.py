"""A dump that changes between runs: metadata edits, deleted and moved files, deterministic
duplicates, the deletion safety valve, old ledgers upgraded in place (real Ray, real LanceDB)."""

from __future__ import annotations

import json
import os
import shutil

import lancedb
import numpy as np
import polars as pl
import pytest
from conftest import tables
from fault_checks import (
    change_dump,
    cli,
    one_line_error,
    stop_ephemeral_prefect,  # noqa: F401 - autouse
)

from flows.ingest import ingest_flow

pytestmark = pytest.mark.slow


@pytest.fixture
def dump(sample_dump, tmp_path):
    root = tmp_path / "dump"
    shutil.copytree(sample_dump, root)
    return root


@pytest.fixture
def embed_calls(monkeypatch):
    """Counts the files sent to the Ray pipeline (the only place images are embedded)."""
    import tasks.ingest.pipeline

    calls, real = [], tasks.ingest.pipeline.embed_files

    def counting(todo, *args, **kwargs):
        calls.append(todo.num_rows)
        return real(todo, *args, **kwargs)

    monkeypatch.setattr(tasks.ingest.pipeline, "embed_files", counting)
    return calls


def _versions(db: str) -> dict:
    conn = lancedb.connect(db)
    return {n: conn.open_table(n).version for n in ("images", "files", "rejects", "sources")}


def _search_all_ids(db: str, vectors: np.ndarray, version: int | None = None) -> set[str]:
    """Every image id an image→image query with each vector returns (top_k = whole table)."""
    from tasks.query.retrieve import pin_images, search_all

    pinned = pin_images(db, vectors.shape[1], "mmrag-tiny-clip/mmrag-tiny-clip-seed0.safetensors",
                        version)
    n = len(vectors)
    plan = pl.DataFrame({"mode": ["image"] * n, "where": [None] * n, "top_k": [100] * n,
                         "error": [None] * n}, schema_overrides={"where": pl.String,
                                                                 "error": pl.String})
    errors: dict = {}
    hits = search_all(pinned, plan, vectors, errors)
    assert not errors, errors
    return {h["image_id"] for rows in hits.values() for h in rows}


def test_metadata_edits_deletions_and_a_move_apply_without_embedding(dump, settings,
                                                                     ray_session, embed_calls):
    """The issue's "done when": 3 rows get their new city and score, 2 deleted images leave
    `images` and every query result, the moved image keeps its id and vector at its new path,
    nothing is embedded again, and the ledger shows the 3 vanished paths as deleted."""
    ingest_flow.fn(str(dump), settings)
    before = tables(settings.db)
    version_before = lancedb.connect(settings.db).open_table("images").version
    assert embed_calls == [24]
    what = change_dump(dump)

    summary = ingest_flow.fn(str(dump), settings)
    assert embed_calls == [24], "an image was sent to the embedder again"
    assert (summary["todo"], summary["ingested"], summary["metadata_updated"],
            summary["deleted"], summary["images_deleted"], summary["moved"]) == (0, 0, 3, 3, 2, 1)
    t = tables(settings.db)
    by_uri = {r["source_uri"]: r for r in t["images"].iter_rows(named=True)}
    for i, path in enumerate(what["edited"]):
        row = by_uri[str(path)]
        assert (row["city"], row["safer"]) == (f"Renamed City {i}", 9.25)
        old = before["images"].filter(pl.col("source_uri") == str(path)).row(0, named=True)
        assert row["caption"] == old["caption"] and row["livelier"] == old["livelier"]
    files_before = dict(before["files"].select("source_uri", "image_id").iter_rows())
    gone_ids = {files_before[str(p)] for p in what["deleted"]}
    assert not gone_ids & set(t["images"]["image_id"]) and t["images"].height == 22
    old_path, new_path = what["moved"]
    moved = t["images"].filter(pl.col("image_id") == files_before[str(old_path)])
    assert moved["source_uri"].to_list() == [str(new_path)]
    assert moved["rel_path"][0] == os.path.relpath(new_path, os.path.realpath(dump))
    was = before["images"].filter(pl.col("image_id") == files_before[str(old_path)])
    assert np.array_equal(np.stack(moved["vector"].to_numpy()), np.stack(was["vector"].to_numpy()))
    assert moved["caption"][0] == was["caption"][0]  # its metadata row, found by image name
    deleted = t["files"].filter(pl.col("status") == "deleted")
    assert set(deleted["source_uri"]) == {str(p) for p in (*what["deleted"], old_path)}
    assert set(deleted["deleted_run_id"]) == {summary["run_id"]}
    new_row = t["files"].filter(pl.col("source_uri") == str(new_path))
    assert new_row["status"].to_list() == ["ingested"]

    vectors = np.stack(before["images"]["vector"].to_numpy())
    assert gone_ids <= _search_all_ids(settings.db, vectors, version_before)  # time travel
    assert not gone_ids & _search_all_ids(settings.db, vectors)

    versions = _versions(settings.db)
    again = ingest_flow.fn(str(dump), settings)
    assert (again["todo"], again["unchanged"], again["metadata_updated"]) == (0, 22, 0)
    assert _versions(settings.db) == versions, "a no-op re-run must not write anything"


def test_status_shows_live_and_deleted_files_per_source(dump, settings, ray_session):
    from tasks.io.status import db_status

    ingest_flow.fn(str(dump), settings)
    change_dump(dump)
    summary = ingest_flow.fn(str(dump), settings)
    [source] = db_status(settings.db)["sources"]
    assert source["source"] == os.path.realpath(dump) and source["table_set"] == ""
    assert (source["live"], source["deleted"]) == (22, 3)
    assert source["last_run_id"] == summary["run_id"]
    assert (source["metadata_updated"], source["files_deleted"], source["images_deleted"],
            source["moved"]) == (3, 3, 2, 1)


def test_mass_deletion_is_refused_unless_allowed(dump, settings, ray_session, monkeypatch):
    """Half the dump gone (an unmounted disk looks the same): exit 2, one line naming the
    fraction and the flag, every table at its version; --allow-deletes applies it."""
    ingest_flow.fn(str(dump), settings)
    for path in sorted((dump / "images").rglob("*.JPG"))[:12]:
        path.unlink()
    versions = _versions(settings.db)
    env = {"MMRAG_PROFILE": "tiny", "MMRAG_DB": settings.db, "MMRAG_CACHE_DIR": settings.cache_dir,
           "MMRAG_WORK_DIR": settings.work_dir, "MMRAG_EMBED_ACTOR_CPUS": "0.5",
           "MMRAG_DECODE_CPUS": "0.25"}
    line = one_line_error(cli(["ingest", str(dump)], monkeypatch, **env))
    assert "12 of the 24 files" in line and "50%" in line and "--allow-deletes" in line
    assert "MMRAG_MAX_DELETE_FRACTION=0.2" in line
    assert _versions(settings.db) == versions

    # the setting moves the valve too (MMRAG_MAX_DELETE_FRACTION)
    assert ingest_flow.fn(str(dump), settings.model_copy(update={"max_delete_fraction": 0.6}))[
        "deleted"] == 12
    t = tables(settings.db)
    assert t["images"].height == 12 and (t["files"]["status"] == "deleted").sum() == 12


def test_allow_deletes_flag_applies_them(dump, settings, ray_session, monkeypatch):
    ingest_flow.fn(str(dump), settings)
    for path in sorted((dump / "images").rglob("*.JPG"))[:20]:
        path.unlink()
    env = {"MMRAG_PROFILE": "tiny", "MMRAG_DB": settings.db, "MMRAG_CACHE_DIR": settings.cache_dir,
           "MMRAG_WORK_DIR": settings.work_dir}
    result = cli(["ingest", str(dump), "--allow-deletes"], monkeypatch, **env)
    assert result.exit_code == 0, result.output[-2000:]
    assert "files deleted 20 (images removed 20)" in result.output
    t = tables(settings.db)
    assert t["images"].height == 4 and (t["files"]["status"] == "deleted").sum() == 20


def test_duplicates_are_decided_by_path_not_arrival(dump, settings, ray_session, embed_calls):
    """The smallest source_uri among identical files is `ingested` (and its metadata is the
    image's), whatever came first; when it goes, the next one takes over without embedding."""
    ingest_flow.fn(str(dump), settings)
    original = sorted((dump / "images").rglob("*.JPG"))[7]
    copy = dump / "0-copy-first.jpg"  # sorts before images/…
    shutil.copy(original, copy)
    ingest_flow.fn(str(dump), settings)
    t = tables(settings.db)
    pair = dict(t["files"].filter(pl.col("source_uri").is_in([str(original), str(copy)]))
                .select("source_uri", "status").iter_rows())
    assert pair == {str(copy): "ingested", str(original): "duplicate"}
    image = t["images"].filter(pl.col("source_uri") == str(copy))
    assert image.height == 1 and image["caption"][0] is None  # the copy has no metadata row
    assert ingest_flow.fn(str(dump), settings)["todo"] == 0  # stable across re-runs

    copy.unlink()
    summary = ingest_flow.fn(str(dump), settings)
    assert (summary["deleted"], summary["images_deleted"], summary["todo"]) == (1, 0, 0)
    t = tables(settings.db)
    back = t["images"].filter(pl.col("image_id") == image["image_id"][0])
    assert back["source_uri"].to_list() == [str(original)] and back["caption"][0]
    assert t["files"].filter(pl.col("source_uri") == str(original))["status"][0] == "ingested"
    assert embed_calls == [24, 1]

    fresh = settings.model_copy(update={"db": str(settings.db) + "-fresh"})
    shutil.copy(original, copy)
    ingest_flow.fn(str(dump), fresh)
    statuses = dict(tables(fresh.db)["files"].select("source_uri", "status").iter_rows())
    assert statuses[str(copy)] == "ingested" and statuses[str(original)] == "duplicate"


def test_an_older_ledger_is_upgraded_in_place(dump, settings, ray_session, embed_calls):
    """A database written before the ledger had meta_hash/deleted columns and a sources
    table: opened, upgraded (rows kept), checked once, then incremental as usual."""
    ingest_flow.fn(str(dump), settings)
    conn = lancedb.connect(settings.db)
    conn.open_table("files").drop_columns(["meta_hash", "deleted_run_id", "deleted_at"])
    conn.drop_table("sources")
    old = conn.open_table("files").to_polars().collect()

    summary = ingest_flow.fn(str(dump), settings)
    assert (summary["todo"], summary["metadata_updated"], summary["deleted"]) == (0, 0, 0)
    files = tables(settings.db)["files"]
    assert files.drop("meta_hash", "deleted_run_id", "deleted_at").sort("source_uri").equals(
        old.sort("source_uri"))
    assert files["meta_hash"].null_count() == 0
    versions = _versions(settings.db)
    assert ingest_flow.fn(str(dump), settings)["todo"] == 0
    assert _versions(settings.db) == versions
    assert embed_calls == [24]


def test_metadata_row_moves_do_not_change_reject_keys(dump, settings, ray_session):
    """Rows inserted above a bad row leave its reject where it was (keyed by image name)."""
    meta = dump / "metadata.json"
    records = json.loads(meta.read_text())
    records[4]["livelier"] = "not a number"
    meta.write_text(json.dumps(records))
    ingest_flow.fn(str(dump), settings)
    keys = set(tables(settings.db)["rejects"]["source_uri"])
    rel = records[4]["Relative Path"].replace("\\", "/")
    assert keys == {f"{os.path.realpath(meta)}#image={rel}"}
    meta.write_text(json.dumps([{"Image Name": "extra.jpg", "Caption": ["x"]}] + records))
    ingest_flow.fn(str(dump), settings)
    rejects = tables(settings.db)["rejects"]
    assert set(rejects.filter(pl.col("stage") == "metadata")["source_uri"]) == keys
