"""Dumps, LanceDB and answers on a real S3-compatible server (moto_server) on loopback.

The server runs in its own process (no GIL shared with the pipeline); credentials are dummy
values set in the environment for the test only.  The session's Ray was started before they
were set, so this also checks that the storage config reaches the decode tasks explicitly.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import boto3
import lancedb
import polars as pl
import pyarrow.parquet as pq
import pytest
from pyarrow import fs as pafs

from flows import config
from tasks.io.objstore import StorageConfig, filesystem, storage_options

pytestmark = pytest.mark.slow
BUCKET = "mmrag-test"
DUMMY = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
         "AWS_DEFAULT_REGION": "us-east-1"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_listening(port: int, proc: subprocess.Popen, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"moto_server exited with {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise TimeoutError("moto_server did not start listening")


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server with one bucket; yields the StorageConfig; always stopped."""
    port = _free_port()
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "w")  # noqa: SIM115
    server = Path(sys.executable).with_name("moto_server")
    proc = subprocess.Popen([str(server), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=log, stderr=subprocess.STDOUT)
    with pytest.MonkeyPatch.context() as mp:
        for k, v in DUMMY.items():
            mp.setenv(k, v)
        try:
            _wait_listening(port, proc)
            cfg = StorageConfig.create(f"http://127.0.0.1:{port}", "us-east-1", True,
                                       os.environ)
            boto3.client("s3", endpoint_url=cfg.endpoint, region_name=cfg.region).create_bucket(
                Bucket=BUCKET)
            yield cfg
        finally:
            proc.terminate()
            proc.wait(timeout=30)
            log.close()


@pytest.fixture(scope="module")
def world(s3, tmp_path_factory, cache_dir, ray_session):
    """A sample dump (+ two bad files) uploaded to s3://BUCKET/dump, and settings for it."""
    from mmrag.samples.dump import generate_sample_dump
    from mmrag.settings import Settings

    base = tmp_path_factory.mktemp("s3world")
    local = base / "dump"
    generate_sample_dump(local, 8, seed=3)
    (local / "images" / "bad").mkdir(parents=True, exist_ok=True)
    (local / "images" / "bad" / "not-an-image.jpg").write_bytes(b"plain text, not a JPEG")
    (local / "images" / "bad" / "empty.png").write_bytes(b"")
    fs_, _ = filesystem(f"s3://{BUCKET}", s3)
    pafs.copy_files(str(local), f"{BUCKET}/dump", source_filesystem=pafs.LocalFileSystem(),
                    destination_filesystem=fs_)
    settings = Settings(
        db=f"s3://{BUCKET}/db", out=f"s3://{BUCKET}/out", s3_endpoint=s3.endpoint,
        s3_region=s3.region, s3_allow_http=True, profile="tiny", cache_dir=str(cache_dir),
        work_dir=str(base / "work"), batch_size=16, decode_batch_size=8, commit_rows=64,
        embed_actor_cpus=0.5, decode_cpus=0.25, engine="none", query_image_roots=[str(local)])
    return base, local, settings


def _tables(settings) -> dict:
    db = lancedb.connect(settings.db, storage_options=storage_options(settings.db,
                                                                       _cfg(settings)))
    return {n: db.open_table(n) for n in ("images", "files", "rejects")}


def _cfg(settings) -> StorageConfig:
    return config.storage(settings)


def test_listing_and_reading_match_the_local_dump(world):
    from tasks.ingest.discover import list_dump
    from tasks.io.images import Rejected, read_bytes
    from tasks.query.prompts import load_thumbnail

    _, local, settings = world
    listing = list_dump(f"s3://{BUCKET}/dump", _cfg(settings))
    local_listing = list_dump(str(local))
    assert sorted(listing["rel_path"].to_pylist()) == sorted(local_listing["rel_path"].to_pylist())
    assert all(u.startswith(f"s3://{BUCKET}/dump/") for u in listing["source_uri"].to_pylist())
    first = listing.sort_by("rel_path")
    uri, rel = first["source_uri"][0].as_py(), first["rel_path"][0].as_py()
    assert read_bytes(uri, _cfg(settings)) == (local / rel).read_bytes()
    assert load_thumbnail(uri, 64, storage=_cfg(settings)) is not None  # prompt grids
    with pytest.raises(Rejected) as missing:
        read_bytes(f"s3://{BUCKET}/dump/gone.jpg", _cfg(settings))
    assert missing.value.stage == "missing"


def test_ingest_into_lancedb_on_s3_then_rerun_is_a_no_op(world):
    from flows.ingest import ingest_flow

    _, _, settings = world
    first = ingest_flow.fn(f"s3://{BUCKET}/dump", settings)
    assert first["ingested"] == 8 and first["rejected"].get("decode") == 2, first
    t = _tables(settings)
    images = t["images"].to_polars().collect()
    assert images.height == 8 and images["city"].null_count() == 0
    assert images["source_uri"].str.starts_with(f"s3://{BUCKET}/dump/images/").all()
    assert t["rejects"].count_rows() == 2 and t["files"].count_rows() == 10
    versions = {n: tbl.version for n, tbl in t.items()}
    again = ingest_flow.fn(f"s3://{BUCKET}/dump", settings)
    assert again["todo"] == 0 and again["unchanged"] == 10
    assert {n: tbl.version for n, tbl in _tables(settings).items()} == versions


def test_query_writes_answers_to_s3(world):
    from flows.ingest import ingest_flow
    from flows.query import query_flow
    from mmrag.samples.queries import write_sample_queries
    from tasks.io.answers import read_answers

    base, local, settings = world
    ingest_flow.fn(f"s3://{BUCKET}/dump", settings)  # no-op when the test above ran
    queries = base / "q.jsonl"
    write_sample_queries(queries, local)
    summary = query_flow.fn(str(queries), settings, "s3run", "2026-01-02")
    want = f"s3://{BUCKET}/out/answers/run_date=2026-01-02/s3run.parquet"
    assert summary["output"] == want and summary["queries"] == 8
    fs_, path = filesystem(want, _cfg(settings))
    assert pq.read_table(path, filesystem=fs_).num_rows == 8
    answers = read_answers(settings.out, _cfg(settings)).collect()
    assert answers.height == 8 and answers["run_date"].unique().to_list() == [
        pl.Series(["2026-01-02"]).str.to_date()[0]]
    ok = answers.filter(pl.col("error").is_null())
    hits = ok.filter(pl.col("query_id") != "injection")  # a literal city that matches nothing
    assert ok.height == 6 and hits["retrieved"].list.len().min() > 0
    assert hits["prompt_images"].list.len().min() > 0  # grids were built from s3:// images
    listing = fs_.get_file_info(pafs.FileSelector(f"{BUCKET}/out", recursive=True))
    assert not [i.path for i in listing if i.base_name.startswith(".")]  # no temp objects


def test_answers_rerun_replaces_the_object(world):
    from tasks.io.answers import read_answers, write_answers

    _, _, settings = world
    out, cfg = f"s3://{BUCKET}/out-replace", _cfg(settings)
    assert read_answers(out, cfg).collect().height == 0
    write_answers([{"run_id": "r", "query_id": "a"}, {"run_id": "r", "query_id": "b"}], out,
                  "2026-01-03", "r", cfg)
    write_answers([{"run_id": "r", "query_id": "c"}], out, "2026-01-03", "r", cfg)
    assert read_answers(out, cfg).collect()["query_id"].to_list() == ["c"]

