"""A dump on object storage changes: the same rules as a local dump (moto_server on loopback)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import boto3
import lancedb
import polars as pl
import pytest

from flows import config
from tasks.io.objstore import StorageConfig, storage_options

pytestmark = pytest.mark.slow
BUCKET = "mmrag-changes"
DUMMY = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
         "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture
def s3(tmp_path, monkeypatch):
    """A moto S3 server with one bucket, always stopped; yields (StorageConfig, boto3 client)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = Path(sys.executable).with_name("moto_server")
    with open(tmp_path / "moto.log", "w") as log:
        proc = subprocess.Popen([str(server), "-H", "127.0.0.1", "-p", str(port)],
                                stdout=log, stderr=subprocess.STDOUT)
        try:
            for k, v in DUMMY.items():
                monkeypatch.setenv(k, v)
            _wait_listening(port, proc)
            cfg = StorageConfig.create(f"http://127.0.0.1:{port}", "us-east-1", True,
                                       os.environ)
            client = boto3.client("s3", endpoint_url=cfg.endpoint, region_name=cfg.region)
            client.create_bucket(Bucket=BUCKET)
            yield cfg, client
        finally:
            proc.terminate()
            proc.wait(timeout=30)


def _wait_listening(port: int, proc: subprocess.Popen, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "moto_server exited"
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise TimeoutError("moto_server did not start listening")


def test_object_storage_dump_changes_apply_like_local_ones(s3, tmp_path, cache_dir,
                                                           ray_session):
    from flows.ingest import ingest_flow
    from mmrag.samples.dump import generate_sample_dump
    from mmrag.settings import Settings

    cfg, client = s3
    records = generate_sample_dump(tmp_path / "dump", 8, seed=5, size=(320, 240))
    keys = [f"dump/{r['Relative Path'].replace(chr(92), '/')}" for r in records]
    for key, rec in zip(keys, records, strict=True):
        client.upload_file(str(tmp_path / "dump" / rec["Relative Path"].replace("\\", "/")),
                           BUCKET, key)
    client.put_object(Bucket=BUCKET, Key="dump/metadata.json", Body=json.dumps(records))
    settings = Settings(db=str(tmp_path / "db"), s3_endpoint=cfg.endpoint, s3_region=cfg.region,
                        s3_allow_http=True, profile="tiny", cache_dir=str(cache_dir),
                        work_dir=str(tmp_path / "work"), batch_size=8, decode_batch_size=4,
                        commit_rows=64, embed_actor_cpus=0.5, decode_cpus=0.25)
    source = f"s3://{BUCKET}/dump"
    assert ingest_flow.fn(source, settings)["ingested"] == 8
    ids = dict(_table(settings, "files").select("source_uri", "image_id").iter_rows())

    records[0]["City"] = "Renamed"
    client.put_object(Bucket=BUCKET, Key="dump/metadata.json", Body=json.dumps(records))
    client.delete_object(Bucket=BUCKET, Key=keys[1])
    moved = f"dump/elsewhere/{keys[2].rsplit('/', 1)[-1]}"
    client.copy_object(Bucket=BUCKET, Key=moved, CopySource={"Bucket": BUCKET, "Key": keys[2]})
    client.delete_object(Bucket=BUCKET, Key=keys[2])

    summary = ingest_flow.fn(source, settings)
    assert (summary["todo"], summary["metadata_updated"], summary["deleted"],
            summary["images_deleted"], summary["moved"]) == (0, 1, 2, 1, 1)
    images = _table(settings, "images")
    by_id = {r["image_id"]: r for r in images.iter_rows(named=True)}
    assert by_id[ids[f"s3://{BUCKET}/{keys[0]}"]]["city"] == "Renamed"
    assert ids[f"s3://{BUCKET}/{keys[1]}"] not in by_id
    assert by_id[ids[f"s3://{BUCKET}/{keys[2]}"]]["source_uri"] == f"s3://{BUCKET}/{moved}"
    files = _table(settings, "files")
    assert set(files.filter(pl.col("status") == "deleted")["source_uri"]) == {
        f"s3://{BUCKET}/{keys[1]}", f"s3://{BUCKET}/{keys[2]}"}
    assert ingest_flow.fn(source, settings)["todo"] == 0


def _table(settings, name: str) -> pl.DataFrame:
    db = lancedb.connect(settings.db, storage_options=storage_options(
        settings.db, config.storage(settings)))
    return db.open_table(name).to_polars().collect()
