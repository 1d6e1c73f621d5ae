"""Ingest throughput with caption vectors vs without, in one run on one machine.

The whole embedding stage of an ingest (``tasks.ingest.run.process``: Ray decode tasks, the
CLIP actor pool, LanceDB commits) over the same planned dump, with ``text`` None (no caption
vectors) and with the CLIP text tower (the default), alternated A B B A so drift hits both
equally, after one discarded warm-up run (the first pipeline of a process is slower: 11.9
against 17.2 img/s measured).  Random ViT-B-32 weights: same architecture, same cost as the
real ones.
"""

from __future__ import annotations

import os
import shutil
import statistics
import time
from pathlib import Path

from benchmarks.common import BENCH_DIR, record, sample_dump, vit_b32_checkpoint

N = int(os.environ.get("BENCH_CAPTIONS_N", 1024))


def one_run(dump: Path, spec, text, tag: str, opts: dict) -> float:
    from tasks.ingest import run as ingest
    from tasks.models.clip import model_shape

    root = BENCH_DIR / f"captions-{tag}"
    shutil.rmtree(root, ignore_errors=True)
    db, plan = str(root / "db"), root / "plan.parquet"
    ingest.prepare(str(dump), db, spec, model_shape(spec)[0], "bench", plan)
    start = time.perf_counter()
    counts = ingest.process(plan, db, spec, "bench", opts | {"text": text})
    seconds = time.perf_counter() - start
    assert counts.ingested == N, counts
    return N / seconds


def main() -> None:
    from tasks.io.cluster import RayConfig, init_ray
    from tasks.models.clip import ClipSpec
    from tasks.models.text import TextSpec

    dump = sample_dump(N, seed=7)
    spec = ClipSpec("ViT-B-32", vit_b32_checkpoint(), precision="auto")
    text = TextSpec("clip", spec)
    init_ray(RayConfig(None, None, str(BENCH_DIR / "ray")))
    opts = dict(max_pixels=64_000_000, batch_size=32, decode_batch_size=32, actors=2,
                actor_cpus=0.9, decode_cpus=0.2, threads=1, out_rows=2048)  # the defaults
    one_run(dump, spec, text, "warmup", opts)  # the first pipeline of a process pays imports
    runs: dict[str, list[float]] = {"without": [], "with": []}
    for i, name in enumerate(("without", "with", "with", "without")):
        runs[name].append(one_run(dump, spec, text if name == "with" else None, f"{name}{i}",
                                  opts))
    without, with_ = statistics.mean(runs["without"]), statistics.mean(runs["with"])
    record("caption_vectors", {
        "model": "ViT-B-32 + its text tower", "images": N,
        "without_img_s": [round(r, 1) for r in runs["without"]],
        "with_img_s": [round(r, 1) for r in runs["with"]],
        "ratio": round(with_ / without, 3)})
