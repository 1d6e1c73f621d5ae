"""Generation: batched vs one-prompt-at-a-time with the transformers engine (tiny LLaVA, CPU).

For vLLM on a GPU machine (see docs/performance.md), ``MMRAG_ENGINE=vllm python -m benchmarks
generation`` runs the same comparison through the vllm engine.
"""

from __future__ import annotations

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
    rates = {}
    for label, batch in (("one_at_a_time", 1), ("batched", BATCH)):
        engine = make_engine(EngineConfig(name, model, max_new_tokens=TOKENS, batch_size=batch))
        engine.generate(requests[:2])
        start = time.perf_counter()
        results = engine.generate(requests)
        rates[label] = N / (time.perf_counter() - start)
        assert all(r.error is None for r in results)
    record("generation", {"engine": name, "model": os.path.basename(model), "prompts": N,
                          "max_new_tokens": TOKENS, "batch": BATCH,
                          "prompts_per_s": {k: round(v, 2) for k, v in rates.items()},
                          "speedup": round(rates["batched"] / rates["one_at_a_time"], 2)})
