"""The embedding pipeline started ahead of its plan: it waits for the plan, embeds exactly
what a pipeline started after planning embeds, and ends without input when cancelled."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import polars as pl
import pytest

import tasks.ingest.pipeline
from flows import config
from flows.early import cool_down
from flows.ingest import plan_source
from tasks.ingest import prestart
from tasks.ingest import run as ingest
from tasks.ingest.pipeline import read_plan_shard
from tasks.models.clip import model_shape
from tests.conftest import tables


def _prestart(settings, dump: Path) -> int:
    spec = config.clip_spec(settings)
    n = ingest.new_file_count(str(dump), settings.db, spec, model_shape(spec)[0])
    ingest.prestart_embedding(n, settings.db, spec, settings.work_dir,
                              config.pipeline_opts(settings))
    return n


def _prestart_thread_ends(timeout: float = 60) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(t.name == "ingest-prestart" for t in threading.enumerate()):
            return True
        time.sleep(0.2)
    return False


@pytest.mark.slow
def test_the_prestarted_pipeline_embeds_the_plan_it_is_fed(sample_dump, settings, ray_session,
                                                           monkeypatch):
    assert _prestart(settings, sample_dump) == 24
    monkeypatch.setattr(tasks.ingest.pipeline, "embed_files",
                        lambda *a, **k: pytest.fail("a second pipeline was started"))
    plan_path, planned = plan_source(str(sample_dump), settings, "run-1")
    spec = config.clip_spec(settings)
    counts = ingest.process(Path(plan_path), settings.db, spec, "run-1",
                            config.pipeline_opts(settings))
    assert counts.todo == planned["todo"] and counts.ingested + counts.duplicates == counts.todo
    assert prestart.take(ingest.prestart_key(settings.db, spec, {})) is None
    assert not list((Path(settings.work_dir) / "prestart").iterdir()), "hand-off left behind"
    assert _prestart_thread_ends()
    monkeypatch.undo()
    fresh = pl.concat(pl.from_arrow(t) for t in tasks.ingest.pipeline.embed_files(
        pl.read_parquet(plan_path).drop("escape").to_arrow(), spec,
        **ingest.pipeline_args(spec, config.pipeline_opts(settings), None)))
    stored = tables(settings.db)["images"].select("image_id", "vector")
    both = fresh.select("image_id", "vector").join(stored, on="image_id", suffix="_stored")
    assert both.height == stored.height == counts.ingested
    assert np.allclose(np.stack(both["vector"].to_list()),
                       np.stack(both["vector_stored"].to_list()), atol=1e-5)


@pytest.mark.slow
def test_an_unused_prestarted_pipeline_is_cancelled(sample_dump, settings, ray_session):
    _prestart(settings, sample_dump)
    assert cool_down()
    assert _prestart_thread_ends(), "the cancelled pipeline kept running"
    assert not cool_down()


@pytest.mark.slow
def test_other_settings_get_their_own_pipeline(sample_dump, settings, ray_session):
    _prestart(settings, sample_dump)
    plan_path, planned = plan_source(str(sample_dump), settings, "run-2")
    other = settings.model_copy(update={"batch_size": 8})
    counts = ingest.process(Path(plan_path), other.db, config.clip_spec(other), "run-2",
                            config.pipeline_opts(other))
    assert counts.ingested + counts.duplicates == planned["todo"]
    assert not cool_down(), "the pipeline started for other settings was left running"
    assert _prestart_thread_ends(), "the pipeline started for other settings kept running"


def test_plan_shards_wait_for_the_plan_then_slice_it(tmp_path):
    handoff = tmp_path / "plan.parquet"

    def write_later():  # as Pending.feed hands it over: written aside, renamed into place
        time.sleep(0.3)
        tmp = tmp_path / "plan.parquet.tmp"
        pl.DataFrame({"source_uri": [f"f{i}" for i in range(5)],
                      "escape": [None] * 5}).write_parquet(tmp)
        tmp.replace(handoff)

    threading.Thread(target=write_later).start()
    rows = read_plan_shard({"id": np.array([1])}, str(handoff), block=2, wait_s=10)
    assert rows.column_names == ["source_uri"]
    assert rows.column("source_uri").to_pylist() == ["f2", "f3"]
    assert read_plan_shard({"id": np.array([4])}, str(handoff), 2, 10).num_rows == 0


def test_plan_shards_end_empty_when_cancelled_and_fail_after_the_wait(tmp_path):
    handoff = str(tmp_path / "plan.parquet")
    with pytest.raises(TimeoutError, match="no plan"):
        read_plan_shard({"id": np.array([0])}, handoff, 2, wait_s=0.2)
    Path(handoff + ".cancel").touch()
    assert read_plan_shard({"id": np.array([0])}, handoff, 2, wait_s=10).num_rows == 0


def test_a_cancelled_shard_decodes_to_no_rows(tmp_path):
    from functools import partial

    from tasks.ingest.pipeline import read_and_decode
    from tasks.io.images import decode_batch

    handoff = str(tmp_path / "plan.parquet")
    Path(handoff + ".cancel").touch()
    out = read_and_decode({"id": np.array([0])}, handoff, 4, 10,
                          partial(decode_batch, size=32, max_pixels=10**6))
    assert out["pixels"].shape == (0, 32, 32, 3) and len(out["stage"]) == 0
