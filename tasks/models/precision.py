"""Which dtype a model computes in: ``precision=auto`` picks bf16 on a CPU only where bf16 is
measured to be faster than fp32 on that CPU.

The CPU flag alone is not enough: a 2-core AMD EPYC with AVX512-BF16 ran ViT-B-32 ~4x faster in
bf16 than in fp32, while a 2-core Intel Xeon VM (Emerald Rapids, AMX hidden by the hypervisor)
that reports the same flag ran it at 0.8x (a ViT-sized matmul at 0.6x).  So ``auto`` times one
such matmul in both dtypes, once per CPU model, torch version and thread count, and remembers
the answer in a small JSON file in the cache directory (``MMRAG_CACHE_DIR``).
"""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from functools import cache
from pathlib import Path

from tasks.io import atomic

log = logging.getLogger(__name__)

#: bf16 must beat fp32 by this much (its vectors move a little: cosine ~0.997 to fp32's)
BF16_MIN_SPEEDUP = 1.25
#: one ViT-B MLP matmul: 800 tokens (16 images × 50) × 768 → 3072
_SHAPE = (800, 768, 3072)
CACHE_FILE = "cpu-precision.json"


def cpu_has_bf16() -> bool:
    """AVX512-BF16 or AMX in the CPU flags: bf16 can only pay where one of them is there."""
    return bool({"avx512_bf16", "amx_bf16"} & _cpu_flags())


@cache
def _cpuinfo() -> list[str]:
    try:
        return Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return []


def _cpu_flags() -> set[str]:
    line = next((x for x in _cpuinfo() if x.startswith(("flags", "Features"))), "")
    return set(line.partition(":")[2].split())


def _cpu_name() -> str:
    line = next((x for x in _cpuinfo() if x.startswith("model name")), "")
    return line.partition(":")[2].strip() or platform.processor() or platform.machine()


def pick_dtype(precision: str, device: str):
    """The dtype the model computes in; int8 quantises the image tower's linear layers and
    computes the rest in fp32 (CPU only)."""
    import torch

    if precision == "int8":
        if device != "cpu":
            raise ValueError("precision int8 is a CPU option; use fp16 on a GPU")
        return torch.float32
    if precision == "auto":
        precision = "fp16" if device == "cuda" else "bf16" if cpu_bf16_pays() else "fp32"
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


@cache
def cpu_bf16_pays() -> bool:
    """Whether bf16 is at least ``BF16_MIN_SPEEDUP`` times fp32 here (measured once per CPU
    model, torch version and thread count; the answer is kept in the cache directory)."""
    if not cpu_has_bf16():
        return False
    import torch

    key = f"{_cpu_name()}|{_isa_limits()}|torch {torch.__version__}|{torch.get_num_threads()}t"
    path = cache_path()
    known = _read(path)
    if key not in known:
        known[key] = round(bf16_speedup(), 3)
        log.info("bf16 vs fp32 on this CPU (%s): %.2fx", key, known[key])
        try:
            atomic.write_bytes(path, json.dumps(_read(path) | {key: known[key]}, indent=1).encode())
        except OSError as e:
            log.warning("could not keep the bf16 measurement in %s: %s", path, e)
    return known[key] >= BF16_MIN_SPEEDUP


def _isa_limits() -> str:
    """The variables that cap torch's instruction sets (set them and the answer changes)."""
    names = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA",
             "MKL_ENABLE_INSTRUCTIONS")
    return ",".join(f"{n}={os.environ[n]}" for n in names if os.environ.get(n))


def cache_path() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(os.environ.get("MMRAG_CACHE_DIR") or Path(base) / "mmrag") / CACHE_FILE


def _read(path: Path) -> dict[str, float]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def bf16_speedup(reps: int = 3) -> float:
    """fp32 time / bf16 time of one ViT-sized matmul, best of ``reps`` each (interleaved, so a
    busy neighbour slows both alike)."""
    import torch

    m, k, n = _SHAPE
    gen = torch.Generator().manual_seed(0)
    a, w = torch.randn(m, k, generator=gen), torch.randn(n, k, generator=gen)
    pairs = {torch.float32: (a, w), torch.bfloat16: (a.bfloat16(), w.bfloat16())}
    best = dict.fromkeys(pairs, float("inf"))
    with torch.inference_mode():
        for _ in range(reps + 1):
            for dtype, (x, y) in pairs.items():
                start = time.perf_counter()
                torch.nn.functional.linear(x, y)
                best[dtype] = min(best[dtype], time.perf_counter() - start)
    return best[torch.float32] / best[torch.bfloat16]
