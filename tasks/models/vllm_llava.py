"""LLaVA through vLLM (the ``gpu`` extra, CUDA machines only): continuous batching, much
higher throughput than transformers on a GPU.  vLLM is imported only when this engine is built.

Every argument the engine sends is listed in ``vllm_arguments``, by vLLM's own names (vLLM
0.33: ``LLM(...)`` takes its named parameters plus ``EngineArgs`` fields such as
``max_model_len`` and ``max_num_seqs``); the tests check them against a recorded list of the
real signatures, so a misspelt or removed argument fails there and not on a GPU machine.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tasks.models.engines import (
    TORCH_DTYPES,
    VLLM_MISSING,
    EngineConfig,
    GenRequest,
    GenResult,
    check_image,
    chunks,
    format_prompt,
    run_with_fallback,
)


def vllm_inputs(batch: Sequence[GenRequest]) -> list[dict[str, Any]]:
    """vLLM offline prompts: llava-1.5 text plus ``multi_modal_data`` when there is an image."""
    inputs: list[dict[str, Any]] = []
    for request in batch:
        check_image(request)
        item: dict[str, Any] = {"prompt": format_prompt(request.prompt, request.image is not None)}
        if request.image is not None:
            item["multi_modal_data"] = {"image": request.image}
        inputs.append(item)
    return inputs


def vllm_arguments(config: EngineConfig) -> tuple[dict, dict]:
    """What the engine passes to ``LLM(...)`` and (per request, plus its seed) to
    ``SamplingParams(...)``: one image per prompt (the grid), greedy at temperature 0, the
    same top_p/top_k as the transformers engine, and the memory/parallelism knobs.  Optional
    knobs left at None are not sent, so vLLM's own defaults apply."""
    llm: dict[str, Any] = {
        "model": config.model, "limit_mm_per_prompt": {"image": 1}, "seed": config.seed,
        "dtype": TORCH_DTYPES.get(config.dtype, config.dtype),
        "gpu_memory_utilization": config.gpu_memory_utilization,
        "tensor_parallel_size": config.tensor_parallel_size,
        "enforce_eager": config.enforce_eager,
    }
    for name in ("max_model_len", "max_num_seqs"):
        if getattr(config, name) is not None:
            llm[name] = getattr(config, name)
    sampling = {"temperature": config.temperature, "top_p": config.top_p,
                "top_k": config.top_k, "max_tokens": config.max_new_tokens,
                "seed": config.seed}
    return llm, sampling


class VllmEngine:
    """LLaVA through vLLM (GPU extra only): continuous batching, much higher throughput on CUDA.

    ``device`` is ignored (vLLM picks its platform); ``batch_size`` is how many requests go to
    vLLM per call, which then schedules them itself, so use a large value on a GPU.  Each
    request gets its own ``SamplingParams`` carrying its seed (vLLM seeds per request).
    """

    name = "vllm"

    def __init__(self, config: EngineConfig) -> None:
        try:
            from vllm import LLM, SamplingParams
        except ImportError as exc:
            raise RuntimeError(VLLM_MISSING) from exc
        self.batch_size = config.batch_size
        llm_kwargs, self.sampling = vllm_arguments(config)
        self.params_class = SamplingParams
        self.llm = LLM(**llm_kwargs)

    def generate(self, requests: list[GenRequest]) -> list[GenResult]:
        results: list[GenResult] = []
        for batch in chunks(requests, self.batch_size):
            results.extend(run_with_fallback(batch, self._generate_batch))
        return results

    def _params(self, request: GenRequest):
        seed = self.sampling["seed"] if request.seed is None else request.seed
        return self.params_class(**(self.sampling | {"seed": seed}))

    def _generate_batch(self, batch: Sequence[GenRequest]) -> list[GenResult]:
        params = [self._params(r) for r in batch]
        outputs = self.llm.generate(vllm_inputs(batch), params, use_tqdm=False)
        return [
            GenResult(
                o.outputs[0].text.strip(),
                None,
                len(o.prompt_token_ids),
                len(o.outputs[0].token_ids),
            )
            for o in outputs
        ]
