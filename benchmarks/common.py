"""Shared benchmark helpers: cached inputs, the random ViT-B-32 checkpoint, timing, RSS."""

from __future__ import annotations

import json
import os
import platform
import time
from contextlib import contextmanager
from pathlib import Path

BENCH_DIR = Path(os.environ.get("MMRAG_BENCH_DIR", "data/bench")).resolve()


def hardware() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB, {platform.python_version()}"


def sample_dump(n: int, seed: int = 0) -> Path:
    """A cached generated dump of ``n`` 640×480 JPEGs."""
    from mmrag.samples.dump import generate_sample_dump

    root = BENCH_DIR / f"dump-{n}-{seed}"
    if not (root / "metadata.json").exists():
        generate_sample_dump(root, n, seed=seed)
    return root


def vit_b32_checkpoint() -> str:
    """Random ViT-B-32 weights saved as a local checkpoint: same architecture, same cost."""
    import open_clip
    import torch
    from safetensors.torch import save_file

    path = BENCH_DIR / "vit-b-32-random.safetensors"
    if not path.exists():
        BENCH_DIR.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(0)
        model = open_clip.create_model("ViT-B-32", pretrained=None)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return str(path)


@contextmanager
def timer(out: dict, key: str):
    start = time.perf_counter()
    yield
    out[key] = time.perf_counter() - start


def tree_rss(pid: int) -> int:
    """Resident bytes of a process and all its descendants (from /proc, Linux only)."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            status = (entry / "status").read_text()
        except OSError:
            continue
        children.setdefault(int(stat[1]), []).append(int(entry.name))
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                rss[int(entry.name)] = int(line.split()[1]) * 1024
    total, stack = 0, [pid]
    while stack:
        p = stack.pop()
        total += rss.get(p, 0)
        stack.extend(children.get(p, []))
    return total


def record(name: str, result: dict) -> None:
    """Append to data/bench/results.jsonl so docs/performance.md can be refreshed from it."""
    BENCH_DIR.mkdir(parents=True, exist_ok=True)
    row = {"benchmark": name, "date": time.strftime("%Y-%m-%d"), "hardware": hardware()} | result
    with open(BENCH_DIR / "results.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row, indent=1))
