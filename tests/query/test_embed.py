"""Query embedding: in process for ordinary files, in Ray CLIP actors for large ones, and the
CLIP model released either way before generation starts."""

from __future__ import annotations

import gc
import weakref

import numpy as np
import polars as pl
import pytest
from PIL import Image

import tasks.query.embed as embed
from tasks.query.embed import RayEmbed, embed_plan


@pytest.fixture(scope="module")
def spec(cache_dir):
    from tasks.models.clip import TINY_NAME, resolve_spec

    return resolve_spec(TINY_NAME, "tiny", str(cache_dir))


def _plan(tmp_path, n_text: int = 5) -> pl.DataFrame:
    good = tmp_path / "q.png"
    Image.new("RGB", (40, 30), (200, 30, 30)).save(good)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    rows = [{"text": f"a street number {i}", "mode": "text", "image_path": None, "error": None}
            for i in range(n_text)]
    rows += [{"text": None, "mode": "image", "image_path": str(good), "error": None},
             {"text": None, "mode": "image", "image_path": str(bad), "error": None},
             {"text": None, "mode": "text", "image_path": None, "error": "no text"}]
    return pl.DataFrame(rows, schema={"text": pl.String, "mode": pl.String,
                                      "image_path": pl.String, "error": pl.String})


def test_the_clip_model_is_released_before_generation(spec, tmp_path, monkeypatch):
    """Nothing keeps the CLIP model alive once the vectors are back, and the CUDA cache is
    emptied (vLLM sizes its KV cache from the GPU memory it finds free)."""
    refs, released = [], []
    real_load = embed.load_clip

    def tracked(s):
        clip = real_load(s)
        refs.append(weakref.ref(clip.model))
        return clip

    monkeypatch.setattr(embed, "load_clip", tracked)
    monkeypatch.setattr(embed, "release_gpu", lambda: released.append(True))
    vectors, errors = embed_plan(_plan(tmp_path), spec, 64_000_000)
    gc.collect()
    assert len(refs) == 1 and refs[0]() is None and released == [True]
    assert np.isfinite(vectors[:6]).all() and np.isnan(vectors[6:]).all()
    assert list(errors) == [6] and errors[6].startswith("query image rejected")


@pytest.mark.slow
def test_large_files_are_embedded_on_ray_with_the_same_vectors(spec, tmp_path, ray_session):
    plan = _plan(tmp_path, n_text=20)
    local, local_errors = embed_plan(plan, spec, 64_000_000)
    on_ray, ray_errors = embed_plan(plan, spec, 64_000_000,
                                    RayEmbed(min_queries=10, actors=1, actor_cpus=0.5, rows=7))
    assert ray_errors == local_errors
    np.testing.assert_allclose(on_ray, local, rtol=1e-5, atol=1e-6)  # NaN rows match too
