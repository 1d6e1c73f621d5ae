"""Multi-scale image embeddings: zoomed centre views pooled, their own table set, same path."""

from __future__ import annotations

import json
import shutil

import lancedb
import numpy as np
import polars as pl
import pytest
from PIL import Image

from flows.config import clip_spec
from schemas.tables import table_names, table_suffix
from tasks.models.clip import check_scales, load_clip, model_shape, resolve_spec


@pytest.fixture(scope="module")
def clips(cache_dir):
    single = load_clip(resolve_spec("mmrag-tiny-clip", "tiny", str(cache_dir)))
    multi = load_clip(resolve_spec("mmrag-tiny-clip", "tiny", str(cache_dir), scales=[2, 1]))
    return single, multi


def test_scales_decode_larger_and_label_their_own_tables(clips):
    single, multi = clips
    assert multi.input_size == 2 * single.image_size == model_shape(multi.spec)[1]
    assert single.input_size == single.image_size == model_shape(single.spec)[1]
    assert multi.spec.label == single.spec.label + "@ms1+2"
    assert table_names(table_suffix(multi.spec.label))[0] != "images"
    for bad in ([2.0], [1.0, 5.0], [1, 1.5, 2, 3, 4], []):
        with pytest.raises(ValueError, match="clip scales"):
            check_scales(bad)


def test_pooled_vector_is_the_mean_of_its_views(clips):
    """Zoom 1 = the whole frame downsized, zoom 2 = the native-resolution centre: the pooled
    vector is the normalised mean of the two single-scale vectors (up to resize differences)."""
    single, multi = clips
    rng = np.random.default_rng(3)
    big = rng.integers(0, 255, (2, multi.input_size, multi.input_size, 3), dtype=np.uint8)
    s, h = single.image_size, multi.input_size
    centre = big[:, (h - s) // 2 : (h - s) // 2 + s, (h - s) // 2 : (h - s) // 2 + s]
    whole = np.stack([np.asarray(Image.fromarray(b).resize((s, s), Image.Resampling.BICUBIC))
                      for b in big])
    expected = single.encode_pixels(whole) + single.encode_pixels(centre)
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    got = multi.encode_pixels(big)
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    assert (got * expected).sum(axis=1) == pytest.approx([1.0, 1.0], abs=5e-3)
    assert ((got * single.encode_pixels(whole)).sum(axis=1) < 0.9999).all()  # views really pooled


def test_single_scale_is_unchanged(clips):
    import torch

    single, _ = clips
    px = np.random.default_rng(4).integers(0, 255, (3, single.image_size, single.image_size, 3),
                                           dtype=np.uint8)
    x = torch.from_numpy(px).permute(0, 3, 1, 2).float() / 255.0
    with torch.inference_mode():
        ref = single.model.encode_image(((x - single._mean) / single._std).to(single.dtype))
    ref = torch.nn.functional.normalize(ref.float(), dim=-1).numpy()
    assert np.allclose(single.encode_pixels(px), ref, atol=1e-5)


@pytest.mark.slow
def test_multiscale_ingest_and_image_query_end_to_end(tmp_path, sample_dump, settings,
                                                     ray_session):
    from flows.ingest import ingest_flow
    from flows.query import query_flow
    from tasks.io.answers import read_answers

    dump = tmp_path / "dump"
    shutil.copytree(sample_dump, dump)
    ms = settings.model_copy(update={"clip_scales": [1, 2], "engine": "none",
                                     "out": str(tmp_path / "out"),
                                     "query_image_roots": [str(dump)]})
    ingest_flow.fn(str(dump), ms)
    db = lancedb.connect(ms.db)
    name = table_names(table_suffix(clip_spec(ms).label))[0]
    images = db.open_table(name).to_polars().collect()
    assert images.height == 24 and images["clip_model"].str.ends_with("@ms1+2").all()
    photo = images["source_uri"][5]
    queries = tmp_path / "q.jsonl"
    queries.write_text(json.dumps({"query_id": "i", "image": photo, "top_k": 3}) + "\n")
    query_flow.fn(str(queries), ms, "ms", "2026-01-01")
    row = read_answers(ms.out).filter(pl.col("run_id") == "ms").collect().row(0, named=True)
    assert row["images_table"] == name and row["error"] is None
    top = row["retrieved"][0]
    assert top["source_uri"] == photo and top["similarity"] == pytest.approx(1.0, abs=1e-3)
