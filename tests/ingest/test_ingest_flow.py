"""End to end through real Ray and real LanceDB (the flow body via ``.fn()``, no Prefect server)."""

from __future__ import annotations

import os
import shutil
import time

import numpy as np
import polars as pl
import pytest
from conftest import tables

from flows import config
from flows.early import warm_up
from flows.ingest import ingest_flow
from tasks.ingest.run import new_file_count
from tasks.models.clip import model_shape

pytestmark = pytest.mark.slow


def ingest(source, settings) -> dict:
    return ingest_flow.fn(str(source), settings)


def has_new_files(source: str, settings) -> bool:
    spec = config.clip_spec(settings)
    return new_file_count(source, settings.db, spec, model_shape(spec)[0]) > 0


@pytest.fixture
def dump(sample_dump, tmp_path):
    root = tmp_path / "dump"
    shutil.copytree(sample_dump, root)
    return root


def test_ingest_sample_dump_then_rerun_is_a_noop(dump, settings, ray_session, monkeypatch):
    started = []
    monkeypatch.setattr("flows.early.init_ray", started.append)
    assert warm_up(str(dump), settings) and len(started) == 1, "new files: Ray starts early"
    monkeypatch.undo()
    first = ingest(dump, settings)
    assert (first["seen"], first["todo"], first["ingested"]) == (24, 24, 24)
    t = tables(settings.db)
    assert t["images"].height == 24 and t["files"].height == 24 and t["rejects"].height == 0
    img = t["images"]
    norms = np.linalg.norm(np.stack(img["vector"].to_numpy()), axis=1)
    assert np.allclose(norms, 1.0, atol=1e-3)
    assert img["city"].null_count() == 0 and img["safer"].null_count() == 0
    assert img["caption"].str.len_chars().min() > 10
    assert set(img["clip_model"]) == {"mmrag-tiny-clip/mmrag-tiny-clip-seed0.safetensors"}
    assert (img["width"] == 640).all() and (img["height"] == 480).all()

    versions = _versions(settings.db)
    monkeypatch.setattr("flows.early.init_ray", started.append)
    assert not warm_up(str(dump), settings) and len(started) == 1, "nothing new: no Ray"
    second = ingest(dump, settings)
    assert (second["unchanged"], second["todo"]) == (24, 0)
    assert _versions(settings.db) == versions, "a no-op re-run must not write anything"


def test_new_and_changed_files_are_picked_up(dump, settings, ray_session, tmp_path):
    from mmrag.samples.dump import generate_sample_dump

    ingest(dump, settings)
    changed = sorted((dump / "images").rglob("*.JPG"))[0]
    extra = tmp_path / "extra"
    generate_sample_dump(extra, 3, seed=99, metadata=False)
    for f in (extra / "images").rglob("*.JPG"):
        shutil.copy(f, dump / "images" / f.name)
    files = tables(settings.db)["files"]
    old_id = files.filter(pl.col("source_uri") == str(changed))["image_id"][0]
    shutil.copy(next((extra / "images").rglob("*.JPG")), changed)
    os.utime(changed, (time.time() + 5, time.time() + 5))

    assert has_new_files(str(dump), settings)
    summary = ingest(dump, settings)
    assert summary["todo"] == 4 and summary["unchanged"] == 23
    assert not has_new_files(str(dump), settings)
    t = tables(settings.db)
    assert t["files"].height == 27
    row = t["files"].filter(pl.col("source_uri") == str(changed))
    assert row["image_id"][0] != old_id
    assert old_id not in t["images"]["image_id"].to_list(), "orphaned image left behind"
    # the changed file now holds the same bytes as one of the new files: one image, two files
    assert t["images"]["image_id"].n_unique() == t["images"].height
    assert sorted(t["files"]["status"].value_counts().rows()) == [("duplicate", 1),
                                                                   ("ingested", 26)]


def test_duplicate_bytes_make_one_image(dump, settings, ray_session):
    first = next((dump / "images").rglob("*.JPG"))
    shutil.copy(first, dump / "copy_of_first.jpg")
    summary = ingest(dump, settings)
    assert (summary["ingested"], summary["duplicates"]) == (24, 1)
    t = tables(settings.db)
    pair = t["files"].filter(pl.col("source_uri").is_in([str(first),
                                                         str(dump / "copy_of_first.jpg")]))
    assert sorted(pair["status"]) == ["duplicate", "ingested"]
    assert pair["image_id"].n_unique() == 1
    winner = pair.filter(pl.col("status") == "ingested")["source_uri"][0]
    assert winner == str(dump / "copy_of_first.jpg")  # the smallest path, not the first to arrive
    assert t["images"].filter(pl.col("image_id") == pair["image_id"][0])["source_uri"][0] == winner
    assert t["images"].height == 24


def test_other_model_table_is_refused(dump, settings, ray_session):
    from tasks.io.store import StoreError

    ingest(dump, settings)
    other = settings.model_copy(update={"clip_model": "ViT-B-32", "clip_pretrained": "x.pt",
                                        "table_suffix": ""})
    with pytest.raises(StoreError, match="configured model is ViT-B-32"):
        ingest(dump, other)


def test_each_model_gets_its_own_tables():
    from schemas.tables import table_names, table_suffix

    assert table_names(table_suffix("ViT-B-32/laion2b_s34b_b79k")) == ("images", "files",
                                                                       "rejects")
    assert table_names(table_suffix("ViT-L-14/openai"))[0] == "images__vit_l_14_openai"
    assert table_suffix("x/../../etc") == "__x_etc"


def _versions(db: str) -> dict:
    import lancedb

    conn = lancedb.connect(db)
    return {n: conn.open_table(n).version for n in ("images", "files", "rejects")}
