"""Incremental no-op and memory: first ingest vs unchanged re-run of 20,000 files, and the
peak RSS (driver + Ray workers) of ingesting 2,000 vs 20,000 images.

Runs each ingest in a subprocess (fresh Ray, tiny model: the no-op path never touches the
model, and the tiny model keeps the first ingest about decode, hashing and writes).  Images are
320×240 to keep generating 20,000 of them affordable.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

from benchmarks.common import BENCH_DIR, record, tree_rss

SMALL, LARGE = 2000, int(os.environ.get("BENCH_INCREMENTAL_N", 20000))
CHILD = """
import json, sys, time
from flows.ingest import ingest_flow
from mmrag.settings import Settings
start = time.perf_counter()
summary = ingest_flow.fn(sys.argv[1], Settings())
summary["flow_seconds"] = time.perf_counter() - start
print("RESULT " + json.dumps(summary))
"""


def dump(n: int):
    from mmrag.samples.dump import generate_sample_dump

    root = BENCH_DIR / f"dump-small-{n}"
    if not (root / "metadata.json").exists():
        generate_sample_dump(root, n, seed=3, size=(320, 240))
    return root


def run_ingest(source, db: str) -> dict:
    env = os.environ | {"MMRAG_PROFILE": "tiny", "MMRAG_DB": db,
                        "MMRAG_WORK_DIR": tempfile.mkdtemp(prefix="bench-w-"),
                        "MMRAG_EMBED_ACTOR_CPUS": "0.5", "MMRAG_DECODE_CPUS": "0.25"}
    start, peak = time.perf_counter(), 0
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(source)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    while proc.poll() is None:
        peak = max(peak, tree_rss(proc.pid))
        time.sleep(0.25)
    out = proc.stdout.read()
    line = next(x for x in out.splitlines() if x.startswith("RESULT "))
    summary = json.loads(line[7:])
    summary.update(wall_seconds=time.perf_counter() - start, peak_rss_mib=peak / 2**20)
    return summary


def main() -> None:
    small, large = dump(SMALL), dump(LARGE)
    db_small, db_large = (tempfile.mkdtemp(prefix="bench-inc-") for _ in range(2))
    first_small = run_ingest(small, db_small)
    first = run_ingest(large, db_large)
    again = run_ingest(large, db_large)
    assert again["todo"] == 0, again
    record("incremental", {
        "files": LARGE,
        "first_ingest_s": round(first["flow_seconds"], 1),
        "noop_rerun_s": round(again["flow_seconds"], 2),
        "noop_fraction": round(again["flow_seconds"] / first["flow_seconds"], 4),
        "noop_rerun_wall_s_incl_python_start": round(again["wall_seconds"], 1),
        "peak_rss_mib": {SMALL: round(first_small["peak_rss_mib"]),
                         LARGE: round(first["peak_rss_mib"])},
        "peak_rss_ratio": round(first["peak_rss_mib"] / first_small["peak_rss_mib"], 3),
    })
