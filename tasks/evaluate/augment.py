"""Seeded photo augmentations for the image→image evaluation (PIL only).

Each kind mimics how a copy of a photo drifts from its original: cropped, scaled down,
re-compressed, colour-corrected; ``combined`` applies all four.  A good retrieval system still
finds the original.  Randomness comes from ``(seed, key, kind)`` alone (``key`` is the image id),
so an image's copy does not depend on which other images were sampled or in which order.
``identity`` returns the original bytes: its query must find the original at rank 1.
"""

from __future__ import annotations

import hashlib
import io

import numpy as np
from PIL import Image, ImageEnhance

from tasks.io.images import open_rgb

KINDS = ("crop", "resize", "jpeg", "jitter", "combined")
IDENTITY = "identity"
WORK_SIZE = 448  # decode at least this large before augmenting (JPEG draft decodes reduced)


def rng_for(seed: int, key: str, kind: str) -> np.random.Generator:
    digest = hashlib.sha256(f"{seed}\x00{key}\x00{kind}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def crop(im: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Keep 60–85 % of each side at a random offset."""
    w, h = im.size
    cw, ch = (max(1, round(s * rng.uniform(0.6, 0.85))) for s in (w, h))
    left, top = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    return im.crop((left, top, left + cw, top + ch))


def resize(im: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Scale down to 30–60 % (at least 32 px a side): a thumbnail of the photo."""
    scale = rng.uniform(0.3, 0.6)
    size = (max(32, round(im.width * scale)), max(32, round(im.height * scale)))
    return im.resize(size, Image.Resampling.BILINEAR)


def jitter(im: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Brightness, contrast and saturation each scaled by 0.6–1.4."""
    for enhancer in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        im = enhancer(im).enhance(float(rng.uniform(0.6, 1.4)))
    return im


_STEPS = {"crop": (crop,), "resize": (resize,), "jitter": (jitter,), "jpeg": (),
          "combined": (crop, resize, jitter)}


def augment(data: bytes, kind: str, seed: int, key: str,
            max_pixels: int = 64_000_000) -> bytes:
    """Encoded bytes of one augmented copy: JPEG at quality 10–40 for ``jpeg``/``combined``,
    lossless PNG otherwise (so only the named change reaches the model)."""
    if kind == IDENTITY:
        return data
    if kind not in _STEPS:
        raise ValueError(f"unknown augmentation {kind!r}; expected {IDENTITY} or one of {KINDS}")
    rng = rng_for(seed, key, kind)
    im = open_rgb(data, WORK_SIZE, max_pixels)[0]
    for step in _STEPS[kind]:
        im = step(im, rng)
    out = io.BytesIO()
    if kind in ("jpeg", "combined"):
        im.save(out, "JPEG", quality=int(rng.integers(10, 41)))
    else:
        im.save(out, "PNG")
    return out.getvalue()
