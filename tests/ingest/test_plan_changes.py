"""Planning a changed dump (fast: Polars frames and a small LanceDB, no Ray): vanished files, the
safety valve, metadata hashes, moves found by their bytes, reconciling duplicates by path."""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime

import numpy as np
import polars as pl
import pyarrow as pa
import pytest

from schemas.tables import files_schema, images_schema
from tasks.ingest.changes import ChangeOptions, DeletionRefused, check_deletions, find_moves
from tasks.ingest.metadata import parse_metadata
from tasks.ingest.plan import plan_ingest, with_metadata
from tasks.ingest.reconcile import reconcile
from tasks.ingest.run import latest
from tasks.io import store

ROOT = "/d"


def _listing(rels: list[str], size: int = 10) -> pa.Table:
    return pa.table({"source_uri": [f"{ROOT}/{r}" for r in rels], "rel_path": rels,
                     "file_name": [r.rsplit("/", 1)[-1] for r in rels],
                     "size": [size] * len(rels), "mtime": [1.0] * len(rels),
                     "escape": pa.nulls(len(rels), pa.string())})


def _meta(rows: list[dict]):
    return parse_metadata(json.dumps(rows).encode(), "json", f"{ROOT}/metadata.json")


def _ledger(listing: pa.Table, meta, status: str = "ingested") -> pl.DataFrame:
    joined, _ = with_metadata(pl.from_arrow(listing), meta, ROOT)
    return joined.with_columns(image_id=pl.col("file_name").map_elements(
        lambda n: hashlib.sha256(n.encode()).hexdigest(), return_dtype=pl.String),
        status=pl.lit(status), run_id=pl.lit("r0"), deleted_run_id=pl.lit(None, pl.String),
        deleted_at=pl.lit(None, pl.Datetime("us", "UTC"))).select(files_schema().names)


def test_vanished_files_are_scoped_to_the_dump():
    listing = _listing(["a.jpg", "b.jpg", "c.jpg"])
    meta = _meta([])
    other = _ledger(_listing(["a.jpg"]), meta).with_columns(
        source_uri=pl.lit("/d2/a.jpg"))  # another dump: "/d2" starts like "/d"
    ledger = pl.concat([_ledger(listing, meta), other])
    plan = plan_ingest(_listing(["a.jpg", "c.jpg"]), meta, ledger, ROOT)
    assert plan.vanished["source_uri"].to_list() == ["/d/b.jpg"]
    assert (plan.known, plan.todo.height, plan.unchanged) == (3, 0, 2)
    deleted = ledger.with_columns(status=pl.when(pl.col("source_uri") == "/d/b.jpg")
                                  .then(pl.lit("deleted")).otherwise(pl.col("status")))
    again = plan_ingest(_listing(["a.jpg", "b.jpg", "c.jpg"]), meta, deleted, ROOT)
    assert again.vanished.height == 0 and again.todo["source_uri"].to_list() == ["/d/b.jpg"]


def test_the_valve_counts_known_files_and_ignores_moves():
    listing = _listing([f"{i}.jpg" for i in range(10)])
    meta = _meta([])
    ledger = _ledger(listing, meta)
    plan = plan_ingest(_listing([f"{i}.jpg" for i in range(7)]), meta, ledger, ROOT)
    none = find_moves(plan, lambda uri: b"")
    with pytest.raises(DeletionRefused) as refused:
        check_deletions(plan, none, ROOT, ChangeOptions(0.2))
    line = str(refused.value)
    assert "\n" not in line and "3 of the 10 files" in line and "30%" in line
    assert "--allow-deletes" in line and "MMRAG_MAX_DELETE_FRACTION=0.2" in line
    check_deletions(plan, none, ROOT, ChangeOptions(0.2, allow_deletes=True))
    check_deletions(plan, none, ROOT, ChangeOptions(0.3))  # 30% is not more than 0.3
    moved = plan.vanished.head(2).select("image_id")
    check_deletions(plan, moved, ROOT, ChangeOptions(0.2))  # only 1 of 10 really gone


def test_the_valve_ignores_files_whose_bytes_are_still_there():
    """A deleted copy, or a move whose new path is already in the ledger (a run killed halfway),
    loses no image: it is deleted without counting toward the valve."""
    listing = _listing([f"{i}.jpg" for i in range(4)])
    meta = _meta([])
    ledger = _ledger(listing, meta)
    copies = ledger.head(2).with_columns(source_uri=pl.format("/d/copy{}", pl.col("source_uri")
                                                              .str.slice(3)))
    plan = plan_ingest(listing, meta, pl.concat([ledger, copies]), ROOT)
    assert plan.vanished["kept"].to_list() == [True, True] and plan.known == 6
    check_deletions(plan, find_moves(plan, lambda uri: b""), ROOT, ChangeOptions(0.2))


def test_moves_are_found_by_size_then_bytes():
    listing = _listing(["old/a.jpg", "old/b.jpg"])
    meta = _meta([])
    ledger = _ledger(listing, meta)
    plan = plan_ingest(_listing(["new/a.jpg", "new/x.jpg", "old/b.jpg"]), meta, ledger, ROOT)
    reads: list[str] = []

    def read(uri: str) -> bytes:
        reads.append(uri)
        return uri.rsplit("/", 1)[-1].encode()  # new/a.jpg holds old/a.jpg's bytes (its id)

    moved = find_moves(plan, read)
    assert moved.select("source_uri", "image_id").rows() == [
        ("/d/new/a.jpg", hashlib.sha256(b"a.jpg").hexdigest())]
    assert sorted(reads) == ["/d/new/a.jpg", "/d/new/x.jpg"]


def test_metadata_hash_changes_only_with_values():
    listing = _listing(["a.jpg", "b.jpg"])
    rows = [{"Relative Path": "a.jpg", "City": "Paris", "safer": "4"},
            {"Relative Path": "b.jpg", "City": "Lyon", "safer": "5"}]
    ledger = _ledger(listing, _meta(rows))
    same = [{"relative_path": "b.jpg", "city": "Lyon", "safer": 5.0}, rows[0]]  # reformatted
    assert plan_ingest(listing, _meta(same), ledger, ROOT).meta_changed.height == 0
    rows[1]["safer"] = "6"
    changed = plan_ingest(listing, _meta(rows), ledger, ROOT).meta_changed
    assert changed["source_uri"].to_list() == ["/d/b.jpg"]


def test_moved_file_keeps_its_row_by_unique_image_name():
    listing = pl.from_arrow(_listing(["new/a.jpg", "x/b.jpg", "y/b.jpg", "z/c.jpg"]))
    meta = _meta([{"Image Name": "a.jpg", "Relative Path": "old/a.jpg", "City": "Paris"},
                  {"Image Name": "b.jpg", "Relative Path": "old1/b.jpg", "City": "Lyon"},
                  {"Image Name": "b.jpg", "Relative Path": "old2/b.jpg", "City": "Nice"},
                  {"Image Name": "c.jpg", "Relative Path": "gone/c.jpg", "City": "Rome"},
                  {"Image Name": "c.jpg", "Relative Path": "z/c.jpg", "City": "Oslo"}])
    joined, missing = with_metadata(listing, meta, ROOT)
    cities = dict(joined.select("rel_path", "city").iter_rows())
    assert cities == {"new/a.jpg": "Paris", "x/b.jpg": None, "y/b.jpg": None, "z/c.jpg": "Oslo"}
    assert sorted(r["source_uri"] for r in missing) == [
        "/d/gone/c.jpg", "/d/old1/b.jpg", "/d/old2/b.jpg"]


def test_reject_keys_follow_the_image_not_the_row_index():
    rows = [{"Relative Path": "a\\x.jpg", "safer": "oops"}, {"Relative Path": "../up.jpg"}, 7]
    first = {r["source_uri"] for r in _meta(rows).rejects}
    shifted = {r["source_uri"] for r in _meta([{"Relative Path": "new.jpg"}, *rows]).rejects}
    assert {k for k in first if "#image=" in k} == {k for k in shifted if "#image=" in k} == {
        f"{ROOT}/metadata.json#image=a/x.jpg", f"{ROOT}/metadata.json#image=../up.jpg"}
    assert f"{ROOT}/metadata.json#row=2" in first  # a row naming no image keeps its index


def test_reconcile_picks_the_smallest_path_whatever_was_stored(tmp_path):
    """Stored as if the larger path had arrived first: statuses and the image row follow the
    smallest live path; its metadata comes with it; the vector is untouched."""
    tables = store.open_tables(str(tmp_path / "db"), 4, "mmrag-tiny-clip/x")
    image_id = "ab" * 32
    now = datetime.now(UTC)
    vector = np.array([0.5, 0.5, 0.5, 0.5], np.float32)
    row = {"image_id": image_id, "source_uri": "/d/z.jpg", "rel_path": "z.jpg",
           "file_name": "z.jpg", "city": "Zurich", "width": 1, "height": 1,
           "clip_model": "mmrag-tiny-clip/x", "run_id": "r0", "ingested_at": now,
           "vector": vector.tolist()}
    tables.images.add(pa.Table.from_pylist([row], schema=images_schema(4)))
    files = [{"source_uri": f"/d/{n}.jpg", "rel_path": f"{n}.jpg", "file_name": f"{n}.jpg",
              "size": 1, "mtime": 1.0, "image_id": image_id, "status": s, "run_id": "r0"}
             for n, s in (("z", "ingested"), ("a", "duplicate"), ("0", "deleted"))]
    store.upsert_files(tables.files, pa.Table.from_pylist(files, schema=files_schema()))
    meta = pl.DataFrame({"source_uri": ["/d/a.jpg"], "city": ["Amsterdam"]})
    meta = meta.with_columns(pl.lit(None).alias(c) for c in
                             ("lat", "lon", "place_id", "caption", "livelier", "more_beautiful",
                              "more_boring", "more_depressing", "safer", "wealthier"))
    done = reconcile(latest(tables), [image_id], meta)
    assert (done.repointed, done.metadata_updated, done.images_deleted) == (1, 1, 0)
    statuses = dict(tables.files.to_polars().select("source_uri", "status").collect().rows())
    assert statuses == {"/d/a.jpg": "ingested", "/d/z.jpg": "duplicate", "/d/0.jpg": "deleted"}
    [stored] = tables.images.to_arrow().to_pylist()
    assert (stored["source_uri"], stored["city"]) == ("/d/a.jpg", "Amsterdam")
    assert np.allclose(stored["vector"], vector)
    again = reconcile(latest(tables), [image_id], meta)
    assert (again.repointed, again.metadata_updated) == (0, 0)
