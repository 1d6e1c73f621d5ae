"""Ingest speed, end to end: ``mmrag ingest`` from CLI start to exit, against the model's own
bound and the per-image loop, all measured in one run on one machine.

- end to end: ``python -m mmrag.cli ingest`` of N images (a fresh database), wall time;
- fixed cost: the same command on a 12-image dump (Python start, Prefect, Ray, model loads,
  exit);
- steady state: ``(N - 12) / (T_N - T_12)``, the rate once the fixed cost is paid;
- model bound: batched ``encode_image`` on pre-decoded pixels at the precision ``auto`` picks
  (and fp32, and the opt-in int8 with the cosine of its vectors to fp32's);
- per-image loop: open, open_clip preprocess, ``encode_image`` batch 1, one-row ``add``.

Same random-weight ViT-B-32 (same cost as the real one), same 640×480 JPEGs.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import record, sample_dump, vit_b32_checkpoint

N_IMAGES = int(os.environ.get("BENCH_INGEST_N", 1500))
N_SMALL = 12
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


def model_bound(pixels: np.ndarray, ckpt: str, precision: str) -> tuple[float, np.ndarray]:
    """Batched encode on pre-decoded pixels, both cores: (images/s, the vectors)."""
    from tasks.models.clip import ClipSpec, load_clip

    clip = load_clip(ClipSpec("ViT-B-32", ckpt, precision=precision))
    clip.encode_pixels(pixels[:8])
    start = time.perf_counter()
    vectors = np.concatenate([clip.encode_pixels(pixels[i : i + BATCH])
                              for i in range(0, len(pixels), BATCH)])
    return len(pixels) / (time.perf_counter() - start), vectors


def cli_ingest(dump: Path, ckpt: str) -> float:
    """Seconds from starting ``mmrag ingest`` to its exit (fresh database, default settings)."""
    work = Path(tempfile.mkdtemp(prefix="bench-cli-"))
    env = os.environ | {"MMRAG_DB": str(work / "db"), "MMRAG_WORK_DIR": str(work / "w"),
                        "MMRAG_CLIP_MODEL": "ViT-B-32", "MMRAG_CLIP_PRETRAINED": ckpt}
    start = time.perf_counter()
    run = subprocess.run([sys.executable, "-m", "mmrag.cli", "ingest", str(dump)], env=env,
                         capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
    if run.returncode != 0:
        raise SystemExit(f"mmrag ingest failed:\n{run.stderr[-2000:]}")
    return seconds


def main() -> None:
    from tasks.io.images import decode
    from tasks.models.clip import pick_dtype

    ckpt, big, small = vit_b32_checkpoint(), sample_dump(N_IMAGES), sample_dump(N_SMALL, seed=1)
    files = sorted((big / "images").rglob("*.JPG"))
    t_small, t_big = cli_ingest(small, ckpt), cli_ingest(big, ckpt)
    steady = (N_IMAGES - N_SMALL) / (t_big - t_small)
    pixels = np.stack([decode(p.read_bytes(), 224, 10**9)[0] for p in files[:256]])
    auto, _ = model_bound(pixels, ckpt, "auto")
    fp32, v32 = model_bound(pixels, ckpt, "fp32")
    int8, v8 = model_bound(pixels, ckpt, "int8")
    loop = per_image_loop(files[:N_LOOP], ckpt)
    e2e = N_IMAGES / t_big
    record("ingest", {
        "images": N_IMAGES, "auto_precision": str(pick_dtype("auto", "cpu")).split(".")[-1],
        "cli_seconds": round(t_big, 1), "cli_img_s": round(e2e, 2),
        "fixed_cost_s": round(t_small, 1), "steady_img_s": round(steady, 2),
        "model_bound_img_s": {"auto": round(auto, 2), "fp32": round(fp32, 2),
                              "int8": round(int8, 2)},
        "int8_cosine_to_fp32": {"min": round(float((v8 * v32).sum(1).min()), 4),
                                "mean": round(float((v8 * v32).sum(1).mean()), 4)},
        "per_image_loop_img_s": round(loop, 2),
        "cli_fraction_of_bound": round(e2e / auto, 2),
        "steady_fraction_of_bound": round(steady / auto, 2),
        "cli_speedup_vs_loop": round(e2e / loop, 2),
    })
