"""A dump holding every kind of bad input: each is rejected with its reason or handled,
and every good image around them is ingested (real Ray, real LanceDB)."""

from __future__ import annotations

import os
import shutil

import polars as pl
import pytest
from conftest import tables

from flows.ingest import ingest_flow

pytestmark = pytest.mark.slow

REJECTED_AT_DECODE = {
    "truncated": "corrupt or truncated",
    "empty": "empty file",
    "not_image": "not an image",
    "bomb": "image too large",
}
HANDLED = ("wrong_extension", "animated", "cmyk", "sixteen_bit", "palette_alpha",
           "exif_rotated", "one_pixel", "panorama", "bad_scores", "long_caption")


@pytest.fixture(scope="module")
def hostile(tmp_path_factory, sample_dump):
    from mmrag.samples.dump import write_bad_inputs

    base = tmp_path_factory.mktemp("hostile")
    root = base / "dump"
    shutil.copytree(sample_dump, root)
    kinds = write_bad_inputs(root, base / "outside")
    return root, kinds


@pytest.fixture(scope="module")
def ingested(hostile, tmp_path_factory, cache_dir, ray_session):
    from mmrag.settings import Settings

    root, kinds = hostile
    work = tmp_path_factory.mktemp("hostile-db")
    settings = Settings(db=str(work / "db"), profile="tiny", cache_dir=str(cache_dir),
                        work_dir=str(work / "work"), batch_size=16, decode_batch_size=8,
                        commit_rows=64, embed_actor_cpus=0.5, decode_cpus=0.25)
    summary = ingest_flow.fn(str(root), settings)
    return root, kinds, settings, summary, tables(settings.db)


def _uri(root, rel):
    return os.path.join(os.path.realpath(root), rel)


def test_decode_rejects_carry_their_reason(ingested):
    root, kinds, _, _, t = ingested
    for kind, reason in REJECTED_AT_DECODE.items():
        rows = t["rejects"].filter(pl.col("source_uri") == _uri(root, kinds[kind]))
        assert rows["stage"].to_list() == ["decode"], kind
        assert reason in rows["error"][0], (kind, rows["error"][0])
        ledger = t["files"].filter(pl.col("source_uri") == _uri(root, kinds[kind]))
        assert ledger["status"].to_list() == ["rejected"] and ledger["image_id"][0] is None


def test_odd_but_valid_images_are_ingested(ingested):
    root, kinds, _, _, t = ingested
    images = t["images"]
    by_uri = {u: r for u, r in zip(t["files"]["source_uri"], t["files"].iter_rows(named=True),
                                   strict=True)}
    for kind in HANDLED:
        row = by_uri[_uri(root, kinds[kind])]
        assert row["status"] == "ingested", kind
        assert row["image_id"] in images["image_id"].to_list(), kind
    def size(kind):
        img = images.filter(pl.col("source_uri") == _uri(root, kinds[kind]))
        return img["width"][0], img["height"][0]
    assert size("exif_rotated") == (480, 640)
    assert size("one_pixel") == (1, 1)
    assert size("panorama") == (10000, 400)
    caption = images.filter(pl.col("source_uri") == _uri(root, kinds["long_caption"]))["caption"]
    assert caption.str.len_chars()[0] == 100_000


def test_path_escapes_are_never_read(ingested):
    root, kinds, _, _, t = ingested
    link = t["rejects"].filter(pl.col("source_uri") == _uri(root, kinds["symlink_outside"]))
    assert link["stage"].to_list() == ["path"] and "outside the dump" in link["error"][0]
    assert _uri(root, kinds["symlink_outside"]) not in t["images"]["source_uri"].to_list()
    path_rows = t["rejects"].filter((pl.col("stage") == "path")
                                    & pl.col("source_uri").str.contains("metadata.json#image="))
    assert path_rows.height == 4  # ../, /abs, C:\, %2e%2e
    assert all(("escapes" in e) or ("absolute" in e) for e in path_rows["error"])


def test_missing_duplicate_and_bad_scores(ingested):
    root, kinds, _, summary, t = ingested
    missing = t["rejects"].filter(pl.col("stage") == "missing")
    assert missing["source_uri"].to_list() == [_uri(root, "images/bad/bad_missing.jpg")]
    dup = t["files"].filter(pl.col("source_uri") == _uri(root, kinds["duplicate"]))
    same = t["files"].filter(pl.col("image_id") == dup["image_id"][0])
    assert sorted(same["status"]) == ["duplicate", "ingested"]
    winner = same.filter(pl.col("status") == "ingested")["source_uri"][0]
    assert winner == min(same["source_uri"])  # the smallest path, whatever arrived first
    scores = t["images"].filter(pl.col("source_uri") == _uri(root, kinds["bad_scores"]))
    nulls = scores.select("livelier", "more_beautiful", "more_boring", "safer").null_count()
    assert nulls.row(0) == (1, 1, 1, 1)
    assert scores["wealthier"].null_count() == 0
    notes = t["rejects"].filter((pl.col("stage") == "metadata")
                                & (pl.col("file_name") == os.path.basename(kinds["bad_scores"])))
    assert "not a finite number" in notes["error"][0]


def test_every_good_image_survives_and_rerun_adds_nothing(ingested):
    root, kinds, settings, summary, t = ingested
    assert summary["ingested"] == 24 + len(HANDLED) + (0 if os.geteuid() else 1)
    assert t["images"].height == summary["ingested"]
    again = ingest_flow.fn(str(root), settings)
    assert again["todo"] == (0 if os.geteuid() == 0 else 1)  # unreadable files are retried
    after = tables(settings.db)
    assert {k: v.height for k, v in after.items()} == {k: v.height for k, v in t.items()}
