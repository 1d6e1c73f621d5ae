"""Decode core, directly on bytes (no Ray): every mode to RGB, every failure with a reason."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from tasks.io.images import Rejected, decode, decode_batch, read_bytes

SIZE, LIMIT = 64, 64_000_000


def _bytes(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def _photo(w=320, h=240) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))


@pytest.mark.parametrize("mode", ["RGB", "L", "CMYK", "RGBA", "P", "I;16", "LA", "1"])
def test_any_mode_becomes_rgb(mode):
    im = _photo().convert("L").convert(mode) if mode == "I;16" else _photo().convert(mode)
    fmt = "JPEG" if mode in ("RGB", "L", "CMYK") else "PNG"
    pixels, w, h = decode(_bytes(im, fmt), SIZE, LIMIT)
    assert pixels.shape == (SIZE, SIZE, 3) and pixels.dtype == np.uint8
    assert (w, h) == (320, 240)


def test_sixteen_bit_is_scaled_not_clipped():
    arr = np.full((32, 32), 65535, np.uint16)
    pixels, _, _ = decode(_bytes(Image.fromarray(arr), "PNG"), SIZE, LIMIT)
    assert pixels.min() == 255


def test_transparent_pixels_composite_on_white():
    im = Image.new("RGBA", (40, 40), (255, 0, 0, 0))
    pixels, _, _ = decode(_bytes(im, "PNG"), SIZE, LIMIT)
    assert (pixels == 255).all()


def test_exif_orientation_is_applied():
    im = _photo(300, 100)
    exif = Image.Exif()
    exif[0x0112] = 6
    pixels, w, h = decode(_bytes(im, "JPEG", exif=exif), SIZE, LIMIT)
    assert (w, h) == (100, 300)


def test_center_crop_keeps_the_middle():
    arr = np.zeros((100, 300, 3), np.uint8)
    arr[:, 100:200] = 255  # a white centre square between black side bands
    pixels, _, _ = decode(_bytes(Image.fromarray(arr), "PNG"), SIZE, LIMIT)
    assert pixels[:, 4:-4].mean() > 250


@pytest.mark.parametrize("data, reason", [
    (b"", "empty file"),
    (b"hello, not an image" * 10, "not an image"),
])
def test_garbage_is_rejected(data, reason):
    with pytest.raises(Rejected) as e:
        decode(data, SIZE, LIMIT)
    assert e.value.stage == "decode" and reason in e.value.error


def test_truncated_jpeg_is_rejected():
    data = _bytes(_photo(), "JPEG")
    with pytest.raises(Rejected, match="truncated"):
        decode(data[: len(data) // 2], SIZE, LIMIT)


def test_pixel_limit_guards_against_bombs():
    data = _bytes(Image.new("1", (5000, 5000)), "PNG")
    assert len(data) < 10_000
    with pytest.raises(Rejected, match="image too large"):
        decode(data, SIZE, max_pixels=1_000_000)


def test_animated_image_uses_the_first_frame():
    frames = [Image.new("RGB", (50, 50), c) for c in ("red", "green", "blue")]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    pixels, _, _ = decode(buf.getvalue(), SIZE, LIMIT)
    assert pixels[..., 0].mean() > 200 and pixels[..., 1].mean() < 50


def test_read_errors_are_classified(tmp_path):
    with pytest.raises(Rejected) as e:
        read_bytes(str(tmp_path / "gone.jpg"))
    assert e.value.stage == "missing"
    with pytest.raises(Rejected) as e:
        read_bytes(str(tmp_path))
    assert e.value.stage == "read"


def test_batch_keeps_every_row(tmp_path):
    good = tmp_path / "good.jpg"
    good.write_bytes(_bytes(_photo(), "JPEG"))
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"nope")
    batch = {"source_uri": np.array([str(good), str(bad), str(tmp_path / "gone.jpg")],
                                    dtype=object)}
    out = decode_batch(batch, SIZE, LIMIT)
    assert list(out["stage"]) == ["", "decode", "missing"]
    assert len(out["image_id"][0]) == 64 and out["image_id"][2] == ""
    assert out["pixels"].shape == (3, SIZE, SIZE, 3) and out["pixels"][1].max() == 0
