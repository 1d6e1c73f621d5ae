"""Generation: batched vs one-prompt-at-a-time with the transformers engine (tiny LLaVA, CPU).

For vLLM on a GPU machine (see docs/operations/real-weights.md), ``MMRAG_ENGINE=vllm python -m
benchmarks generation`` runs the same comparison through the vllm engine.  One engine is built
and both modes run through it (the batch size only changes how many requests go to the engine
per call): a second vLLM engine would find 90% of the GPU still held by the first.  The engine
is released before the function returns.
"""

from __future__ import annotations

import gc
import os
import time

from benchmarks.common import BENCH_DIR, record

N, BATCH, TOKENS = 32, 8, 32


def main() -> None:
    from PIL import Image

    from tasks.models.engines import EngineConfig, GenRequest, make_engine
    from tasks.models.tiny_llava import ensure_tiny_llava

    name = os.environ.get("MMRAG_ENGINE", "transformers")
    model = os.environ.get("MMRAG_VLM_MODEL") or str(ensure_tiny_llava(BENCH_DIR / "models"))
    requests = [GenRequest(f"Is street {i} safe to walk at night? Cite [1].",
                           Image.new("RGB", (336, 336), (i * 7 % 255, 90, 140)))
                for i in range(N)]
    engine = make_engine(EngineConfig(name, model, max_new_tokens=TOKENS, batch_size=BATCH))
    try:
        engine.generate(requests[:2])
        rates = {}
        for label, batch in (("one_at_a_time", 1), ("batched", BATCH)):
            start = time.perf_counter()
            results = [r for i in range(0, N, batch)
                       for r in engine.generate(requests[i : i + batch])]
            rates[label] = N / (time.perf_counter() - start)
            assert all(r.error is None for r in results)
    finally:
        del engine
        _release()
    record("generation", {"engine": name, "model": os.path.basename(model), "prompts": N,
                          "max_new_tokens": TOKENS, "batch": BATCH,
                          "prompts_per_s": {k: round(v, 2) for k, v in rates.items()},
                          "speedup": round(rates["batched"] / rates["one_at_a_time"], 2)})


def _release() -> None:
    """Give the GPU memory of the engine back before anything else starts."""
    gc.collect()
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
