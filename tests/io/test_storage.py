"""Storage settings → pyarrow filesystems and LanceDB options (no server; see test_s3.py)."""

from __future__ import annotations

import pickle

import pytest
from pyarrow import fs as pafs
from pydantic import ValidationError

from flows import config
from mmrag.settings import Settings
from tasks.io.objstore import (
    StorageConfig,
    StorageError,
    filesystem,
    is_local,
    normalise_endpoint,
    storage_options,
)

ENV = {"AWS_ACCESS_KEY_ID": "AKIDEXAMPLE", "AWS_SECRET_ACCESS_KEY": "not-a-real-secret"}


def test_local_paths_stay_local(tmp_path):
    assert is_local(str(tmp_path)) and is_local("file:///x") and not is_local("s3://b/k")
    fs_, path = filesystem(f"file://{tmp_path}")
    assert isinstance(fs_, pafs.LocalFileSystem) and path == str(tmp_path)
    assert storage_options(str(tmp_path), StorageConfig(endpoint="https://e")) is None


@pytest.mark.parametrize(("given", "allow", "want"), [
    (None, False, None), ("", True, None), ("minio:9000", False, "https://minio:9000"),
    ("127.0.0.1:9000", True, "http://127.0.0.1:9000"), ("https://s3.example/", False,
                                                        "https://s3.example"),
    ("http://127.0.0.1:9000", True, "http://127.0.0.1:9000"),
])
def test_endpoint_normalised(given, allow, want):
    assert normalise_endpoint(given, allow) == want


def test_plain_http_needs_the_switch():
    with pytest.raises(StorageError, match="MMRAG_S3_ALLOW_HTTP"):
        normalise_endpoint("http://127.0.0.1:9000", False)
    with pytest.raises(StorageError, match="http"):
        normalise_endpoint("ftp://host", True)
    with pytest.raises(ValidationError, match="MMRAG_S3_ALLOW_HTTP"):
        Settings(s3_endpoint="http://127.0.0.1:9000")


def test_settings_from_environment(monkeypatch):
    monkeypatch.setenv("MMRAG_S3_ENDPOINT", "http://127.0.0.1:9000")
    monkeypatch.setenv("MMRAG_S3_REGION", "eu-west-1")
    monkeypatch.setenv("MMRAG_S3_ALLOW_HTTP", "true")
    s = Settings()
    assert (s.s3_endpoint, s.s3_region, s.s3_allow_http) == ("http://127.0.0.1:9000",
                                                             "eu-west-1", True)
    assert config.storage(s) == StorageConfig.create("http://127.0.0.1:9000", "eu-west-1", True,
                                                     env={})


def test_lance_options_and_credentials_stay_out_of_repr():
    cfg = StorageConfig.create("127.0.0.1:9000", "us-east-1", True, env=ENV)
    assert storage_options("s3://b/db", cfg) == {
        "aws_endpoint": "http://127.0.0.1:9000", "aws_region": "us-east-1",
        "allow_http": "true", "aws_access_key_id": "AKIDEXAMPLE",
        "aws_secret_access_key": "not-a-real-secret"}
    assert "not-a-real-secret" not in repr(cfg) and "AKID" not in repr(cfg)
    assert pickle.loads(pickle.dumps(cfg)) == cfg  # travels to Ray tasks


def test_half_credentials_are_ignored_and_defaults_customise_nothing():
    cfg = StorageConfig.create(None, None, False, env={"AWS_ACCESS_KEY_ID": "only-the-id"})
    assert cfg.access_key is None and not cfg.customised
    assert storage_options("s3://b/db", cfg) is None


def test_s3_filesystem_is_built_from_the_config():
    cfg = StorageConfig.create("127.0.0.1:1", "us-east-1", True, env=ENV)
    fs_, path = filesystem("s3://bucket/dump/a.jpg", cfg)
    assert isinstance(fs_, pafs.S3FileSystem) and path == "bucket/dump/a.jpg"
    assert fs_.region == "us-east-1"
    assert filesystem("s3://bucket/x", cfg)[0] is fs_  # cached: one client per config
