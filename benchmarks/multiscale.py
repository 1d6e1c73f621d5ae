"""Cost of multi-scale image embeddings: ViT-B-32 ``encode_pixels`` with zooms (1,) vs (1, 2).

Model-only throughput on pre-decoded pixels (batch 64, the ingest batch size), so the ratio is
what the CLIP stage of an ingest pays; decoding at 2× the side (4× the pixels) comes on top.
Random weights: same architecture, same cost as the real ones.
"""

from __future__ import annotations

import time

import numpy as np

from benchmarks.common import record, vit_b32_checkpoint

BATCH, ROUNDS = 64, 3


def throughput(scales: tuple[float, ...], ckpt: str) -> float:
    from tasks.models.clip import ClipSpec, load_clip

    clip = load_clip(ClipSpec("ViT-B-32", ckpt, precision="auto", scales=scales))
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 255, (BATCH, clip.input_size, clip.input_size, 3), dtype=np.uint8)
    clip.encode_pixels(pixels[:4])  # warm-up
    start = time.perf_counter()
    for _ in range(ROUNDS):
        clip.encode_pixels(pixels)
    return BATCH * ROUNDS / (time.perf_counter() - start)


def main() -> None:
    ckpt = vit_b32_checkpoint()
    single = throughput((1.0,), ckpt)
    multi = throughput((1.0, 2.0), ckpt)
    record("multiscale", {"model": "ViT-B-32", "batch": BATCH, "single_img_s": round(single, 1),
                          "scales_1_2_img_s": round(multi, 1), "ratio": round(multi / single, 2)})
