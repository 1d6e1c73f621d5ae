"""Shared fixtures: offline environment, one local Ray per session, the tiny CLIP model."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="mmrag-prefect-"))
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")

import pytest  # noqa: E402

CACHE = Path(os.environ.get("MMRAG_TEST_CACHE", Path(tempfile.gettempdir()) / "mmrag-test-cache"))


@pytest.fixture(scope="session")
def cache_dir() -> Path:
    CACHE.mkdir(parents=True, exist_ok=True)
    return CACHE


@pytest.fixture(scope="session")
def ray_session(cache_dir):
    """One local Ray for the whole session (4–9 s to start)."""
    import ray

    from tasks.io.cluster import RayConfig, init_ray

    init_ray(RayConfig(None, 2, str(cache_dir / "ray")))
    yield ray
    ray.shutdown()


@pytest.fixture
def settings(tmp_path, cache_dir):
    from mmrag.settings import Settings

    return Settings(db=str(tmp_path / "db"), profile="tiny", cache_dir=str(cache_dir),
                    work_dir=str(tmp_path / "work"), batch_size=16, decode_batch_size=8,
                    commit_rows=64, embed_actor_cpus=0.5, decode_cpus=0.25)


@pytest.fixture(scope="session")
def sample_dump(tmp_path_factory) -> Path:
    """A read-only 24-image sample dump (copy it before changing it)."""
    from mmrag.samples.dump import generate_sample_dump

    root = tmp_path_factory.mktemp("dump") / "pp"
    generate_sample_dump(root, 24, seed=1)
    return root


def tables(db: str) -> dict:
    """All rows of the three tables as Polars frames."""
    import lancedb

    conn = lancedb.connect(db)
    return {n: conn.open_table(n).to_polars().collect() for n in ("images", "files", "rejects")}
