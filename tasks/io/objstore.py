"""Object storage: turn a URI plus settings into a pyarrow filesystem or LanceDB/Polars options.

One place decides how ``s3://`` is reached, so dumps, the LanceDB database and the answers
dataset all use the same endpoint.  Endpoint, region and the plain-HTTP switch are settings
(``MMRAG_S3_ENDPOINT``, ``MMRAG_S3_REGION``, ``MMRAG_S3_ALLOW_HTTP``); credentials come only
from the standard ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``/``AWS_SESSION_TOKEN``
variables or the machine's default AWS chain (profile, instance role), so they never appear in
settings, Prefect flow parameters or logs.

``StorageConfig`` is a small frozen, picklable value that is passed explicitly to Ray tasks:
workers of a Ray that was started before the variables were set (or on other machines) do not
see the driver's environment.  Credentials found in the driver's environment travel with it
(hidden from ``repr``); without them each worker uses its own default chain.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache

from pyarrow import fs as pafs

from mmrag import settings


class StorageError(ValueError):
    """A storage setting that cannot work (e.g. an http:// endpoint without allow_http)."""


def is_local(uri: str) -> bool:
    """A plain path or ``file://`` URI (everything else goes through pyarrow/lance)."""
    return "://" not in str(uri) or str(uri).startswith("file://")


def normalise_endpoint(endpoint: str | None, allow_http: bool) -> str | None:
    """The settings' endpoint rule, raising ``StorageError``."""
    try:
        return settings.normalise_endpoint(endpoint, allow_http)
    except ValueError as e:
        raise StorageError(str(e)) from None


@dataclass(frozen=True)
class StorageConfig:
    """How to reach ``s3://`` URIs; the default (all None) is plain AWS via the SDK chain."""

    endpoint: str | None = None
    region: str | None = None
    allow_http: bool = False
    access_key: str | None = field(default=None, repr=False)
    secret_key: str | None = field(default=None, repr=False)
    session_token: str | None = field(default=None, repr=False)

    @classmethod
    def create(cls, endpoint: str | None, region: str | None, allow_http: bool,
               env: Mapping[str, str]) -> StorageConfig:
        """Validated settings plus the credentials found in ``env`` (the flows pass the
        process environment; stages never read it themselves)."""
        key, secret = env.get("AWS_ACCESS_KEY_ID"), env.get("AWS_SECRET_ACCESS_KEY")
        has_keys = bool(key and secret)
        return cls(normalise_endpoint(endpoint, allow_http), region or None, bool(allow_http),
                   key if has_keys else None, secret if has_keys else None,
                   (env.get("AWS_SESSION_TOKEN") or None) if has_keys else None)

    @property
    def customised(self) -> bool:
        return any((self.endpoint, self.region, self.access_key))


def filesystem(uri: str, config: StorageConfig | None = None) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or any URI pyarrow knows."""
    if is_local(uri):
        return pafs.LocalFileSystem(), str(uri).removeprefix("file://")
    config = StorageConfig() if config is None else config
    scheme, path = str(uri).split("://", 1)
    if scheme.lower() == "s3" and config.customised:
        return _s3(config, _region(config, path.split("/", 1)[0])), path
    return pafs.FileSystem.from_uri(uri)


def _region(config: StorageConfig, bucket: str) -> str | None:
    """Real AWS without a region: ask for the bucket's (what ``from_uri`` does too)."""
    if config.region or config.endpoint:
        return config.region
    return _bucket_region(bucket)


@lru_cache(maxsize=64)
def _bucket_region(bucket: str) -> str | None:
    try:
        return pafs.resolve_s3_region(bucket)
    except Exception:  # noqa: BLE001 - fall back to the SDK's default region
        return None


@lru_cache(maxsize=16)
def _s3(config: StorageConfig, region: str | None) -> pafs.S3FileSystem:
    """Cached per process: one connection pool per config, not one per file read."""
    kwargs: dict = {"region": region} if region else {}
    if config.endpoint:
        scheme, host = config.endpoint.split("://", 1)
        kwargs.update(endpoint_override=host, scheme=scheme)
    if config.access_key:
        kwargs.update(access_key=config.access_key, secret_key=config.secret_key,
                      session_token=config.session_token)
    return pafs.S3FileSystem(**kwargs)


def storage_options(uri: str, config: StorageConfig | None = None) -> dict[str, str] | None:
    """LanceDB (lance/object_store) options for ``uri``; Polars reads the same keys.

    None for local paths and when nothing is customised (the SDK chain then applies)."""
    if is_local(uri) or not str(uri).lower().startswith("s3://"):
        return None
    config = StorageConfig() if config is None else config
    opts = {"aws_endpoint": config.endpoint, "aws_region": config.region,
            "allow_http": "true" if config.allow_http else None,
            "aws_access_key_id": config.access_key,
            "aws_secret_access_key": config.secret_key,
            "aws_session_token": config.session_token}
    opts = {k: v for k, v in opts.items() if v}
    return opts or None
