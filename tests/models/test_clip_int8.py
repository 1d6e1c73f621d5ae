"""The opt-in int8 image tower: its own table set, quantised MLPs, vectors close to fp32's."""

from __future__ import annotations

import numpy as np
import pytest

from tasks.models.clip import Clip, ClipSpec, pick_dtype, resolve_spec


@pytest.fixture(scope="module")
def specs(cache_dir):
    fp32 = resolve_spec("mmrag-tiny-clip", "tiny", str(cache_dir), precision="fp32")
    return fp32, ClipSpec(fp32.model, fp32.pretrained, fp32.config_dir, precision="int8")


def test_int8_vectors_live_in_their_own_table_set(specs):
    fp32, int8 = specs
    assert int8.label == fp32.label + "@int8"
    assert "@int8" not in ClipSpec("ViT-B-32", "x", precision="bf16").label


def test_int8_is_a_cpu_option():
    with pytest.raises(ValueError, match="CPU option"):
        pick_dtype("int8", "cuda")


def test_int8_tower_is_quantised_and_close_to_fp32(specs):
    fp32, int8 = Clip(specs[0]), Clip(specs[1])
    kinds = {type(m).__module__ for m in int8.model.visual.modules()}
    assert any("quantized" in k for k in kinds), kinds
    assert not any("quantized" in type(m).__module__ for m in fp32.model.visual.modules())
    pixels = np.random.default_rng(0).integers(0, 256, (6, fp32.input_size, fp32.input_size, 3),
                                               dtype=np.uint8)
    a, b = fp32.encode_pixels(pixels), int8.encode_pixels(pixels)
    assert np.allclose(np.linalg.norm(b, axis=1), 1.0, atol=1e-4)
    cosine = (a * b).sum(axis=1)
    assert cosine.min() > 0.98 and not np.array_equal(a, b)
