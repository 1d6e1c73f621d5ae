"""Caption vectors at ingest, after a caption changes, and for tables written before them."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import lancedb
import numpy as np
import polars as pl
import pytest

from schemas.tables import CAPTION_COLUMNS
from tasks.ingest import captions
from tasks.models.clip import model_shape
from tasks.models.text import load_text
from tests.query.caption_fixtures import specs, write_table


def _rows(db: str) -> pl.DataFrame:
    return lancedb.connect(db).open_table("images").to_polars().collect().sort("image_id")


def _close(vectors, texts, text) -> bool:
    """Each stored vector is (to bf16 rounding) the encoder's vector of its caption."""
    want = load_text(text).encode(texts)
    got = np.stack(vectors)
    return bool((np.sum(got * want, axis=1) > 0.99).all())


@pytest.mark.slow
def test_ingest_embeds_captions_and_re_embeds_a_changed_one(sample_dump, tmp_path, settings,
                                                            ray_session):
    from flows.config import text_spec
    from flows.ingest import ingest_flow

    dump = tmp_path / "dump"
    shutil.copytree(sample_dump, dump)
    ingest_flow.fn(str(dump), settings)
    text = text_spec(settings)
    rows = _rows(settings.db)
    captioned = rows.filter(pl.col("caption").is_not_null())
    assert captioned.height and captioned["caption_vector"].null_count() == 0
    assert set(captioned["caption_model"]) == {text.label}
    assert _close(captioned["caption_vector"].to_list(), captioned["caption"].to_list(), text)
    assert rows.filter(pl.col("caption").is_null())["caption_vector"].null_count() == \
        rows["caption"].null_count()

    meta = dump / "metadata.json"
    records = json.loads(meta.read_text())
    records[0]["Caption"] = ["a leafy avenue after rain"]
    meta.write_text(json.dumps(records))
    summary = ingest_flow.fn(str(dump), settings)
    assert (summary["metadata_updated"], summary["captions_embedded"]) == (1, 1)
    after = _rows(settings.db)
    path = os.path.realpath(dump / records[0]["Relative Path"].replace("\\", "/"))
    row = after.filter(pl.col("source_uri") == path)
    assert row["caption"][0] == "a leafy avenue after rain"
    assert _close(row["caption_vector"].to_list(), ["a leafy avenue after rain"], text)
    rest = after.filter(pl.col("source_uri") != path)
    before = rows.filter(pl.col("source_uri") != path)
    assert rest["caption_vector"].to_list() == before["caption_vector"].to_list()


def test_an_old_table_gains_caption_vectors_in_place_without_images(tmp_path, cache_dir):
    clip, text = specs(cache_dir)
    db = str(tmp_path / "db")
    texts = ["tree lined street", None, "quiet road", "", "old church"]
    images, _ = write_table(db, clip, text, texts, old=True)
    assert not any(Path(u).exists() for u in images.to_polars().collect()["source_uri"])
    before, version = _rows(db), images.version
    dim = model_shape(clip)[0]

    counts = captions.backfill_captions(db, dim, clip.label, text)
    assert (counts.upgraded, counts.stale, counts.embedded) == (True, 3, 3)
    after = _rows(db)
    assert set(CAPTION_COLUMNS) <= set(after.columns) and after.height == len(texts)
    assert after["vector"].to_list() == before["vector"].to_list()
    done = after.filter(pl.col("caption_vector").is_not_null())
    assert sorted(done["caption"]) == ["old church", "quiet road", "tree lined street"]
    assert _close(done["caption_vector"].to_list(), done["caption"].to_list(), text)
    old_version = lancedb.connect(db).open_table("images")
    old_version.checkout(version)
    assert "caption_vector" not in old_version.schema.names  # time travel keeps version 1
    assert captions.backfill_captions(db, dim, clip.label, text).embedded == 0

    other = specs(cache_dir, "sentence-transformers")[1]
    again = captions.backfill_captions(db, dim, clip.label, other)
    assert (again.redeclared, again.embedded) == (True, 3)
    table = lancedb.connect(db).open_table("images")
    assert table.schema.field("caption_vector").type.list_size == load_text(other).dim


def test_a_caption_changed_meanwhile_keeps_no_stale_vector(tmp_path, cache_dir):
    from tasks.io.captions import forget_captions

    clip, text = specs(cache_dir)
    db = str(tmp_path / "db")
    images, ids = write_table(db, clip, text, ["tree lined street", "quiet road"])
    image_id = ids["quiet road"]
    images.update(where=f"image_id = '{image_id}'", values={"caption": "busy market"})
    forget_captions(images, [image_id])
    stale = captions.stale_rows(images, text.label)
    assert stale["image_id"].to_list() == [image_id]
    captions._write(images, stale.with_columns(caption=pl.lit("quiet road")),
                    load_text(text).encode(["quiet road"]), text.label)
    row = _rows(db).filter(pl.col("image_id") == image_id)
    assert row["caption_vector"][0] is None, "a vector of the old text was written"
    counts = captions.refresh_captions(images, db, text)
    row = _rows(db).filter(pl.col("image_id") == image_id)
    assert counts.embedded == 1 and _close(row["caption_vector"].to_list(), ["busy market"], text)


def test_cli_backfill_captions(tmp_path, cache_dir, monkeypatch):
    from typer.testing import CliRunner

    from mmrag.cli import app

    clip, text = specs(cache_dir)
    db = str(tmp_path / "db")
    write_table(db, clip, text, ["tree lined street", "quiet road"], old=True)
    monkeypatch.setenv("MMRAG_CACHE_DIR", str(cache_dir))
    monkeypatch.setenv("MMRAG_WORK_DIR", str(tmp_path / "work"))
    runner = CliRunner()
    bad = runner.invoke(app, ["--db", db, "--profile", "tiny", "backfill", "--captions", "x"])
    assert bad.exit_code == 2 and "--captions" in bad.output
    ok = runner.invoke(app, ["--db", db, "--profile", "tiny", "backfill", "--captions"])
    assert ok.exit_code == 0, ok.output
    assert "columns added in place, 2 of 2" in ok.output
