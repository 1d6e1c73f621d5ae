"""Ingest throughput: the pipeline vs the per-image loop vs the model's own bound.

Same random-weight ViT-B-32 (same cost as the real one), same 640×480 JPEGs, same machine,
measured one after the other in one run.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import record, sample_dump, vit_b32_checkpoint

N_IMAGES = int(os.environ.get("BENCH_INGEST_N", 2000))
N_LOOP = int(os.environ.get("BENCH_LOOP_N", 150))
BATCH = 64


def per_image_loop(files: list[Path], ckpt: str) -> float:
    """What the popular libraries do: open, preprocess, encode batch 1, add one row."""
    import lancedb
    import open_clip
    import pyarrow as pa
    import torch
    from PIL import Image

    model, _, preprocess = open_clip.create_model_and_transforms("ViT-B-32", pretrained=ckpt)
    model.eval()
    db = lancedb.connect(tempfile.mkdtemp(prefix="bench-loop-"))
    schema = pa.schema([("path", pa.string()), ("vector", pa.list_(pa.float32(), 512))])
    table = db.create_table("images", schema=schema)
    start = time.perf_counter()
    with torch.inference_mode():
        for path in files:
            x = preprocess(Image.open(path).convert("RGB")).unsqueeze(0)
            v = torch.nn.functional.normalize(model.encode_image(x), dim=-1)[0].numpy()
            table.add([{"path": str(path), "vector": v.tolist()}])
    return len(files) / (time.perf_counter() - start)


def model_bound(files: list[Path], ckpt: str) -> float:
    """Batched encode_image on pre-decoded tensors: the model alone, same batch size."""
    import torch

    from tasks.io.images import decode
    from tasks.models.clip import ClipSpec, load_clip

    clip = load_clip(ClipSpec("ViT-B-32", ckpt, precision="auto"))
    pixels = np.stack([decode(p.read_bytes(), 224, 10**9)[0] for p in files])
    clip.encode_pixels(pixels[:8])
    start = time.perf_counter()
    for i in range(0, len(pixels), BATCH):
        clip.encode_pixels(pixels[i : i + BATCH])
    del torch
    return len(pixels) / (time.perf_counter() - start)


def pipeline(dump: Path, ckpt: str, **overrides) -> tuple[float, dict]:
    """The ingest flow body end to end (list → read → decode → embed → write), Ray running."""
    from flows.ingest import ingest_flow
    from mmrag.settings import Settings

    settings = Settings(db=tempfile.mkdtemp(prefix="bench-db-"), clip_model="ViT-B-32",
                        clip_pretrained=ckpt, work_dir=tempfile.mkdtemp(prefix="bench-w-"),
                        batch_size=BATCH, **overrides)
    start = time.perf_counter()
    summary = ingest_flow.fn(str(dump), settings)
    return summary["todo"] / (time.perf_counter() - start), summary


def main() -> None:
    from tasks.io.cluster import RayConfig, init_ray

    ckpt, dump = vit_b32_checkpoint(), sample_dump(N_IMAGES)
    files = sorted((dump / "images").rglob("*.JPG"))
    init_ray(RayConfig(temp_dir=str(Path(tempfile.gettempdir()) / "bench-ray")))
    configs = {
        "1 actor x 2 threads": dict(embed_actors=1, embed_threads=2),
        "2 actors x 1 thread": dict(embed_actors=2, embed_threads=1, embed_actor_cpus=0.75,
                                    decode_cpus=0.25),
    }
    rates = {name: pipeline(dump, ckpt, **cfg)[0] for name, cfg in configs.items()}
    loop = per_image_loop(files[:N_LOOP], ckpt)
    bound = model_bound(files[:256], ckpt)
    best = max(rates, key=rates.get)
    record("ingest", {
        "images": N_IMAGES, "pipeline_img_s": {k: round(v, 2) for k, v in rates.items()},
        "per_image_loop_img_s": round(loop, 2), "model_bound_img_s": round(bound, 2),
        "best_config": best, "speedup_vs_loop": round(rates[best] / loop, 2),
        "fraction_of_model_bound": round(rates[best] / bound, 2),
    })
