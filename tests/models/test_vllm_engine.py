"""The vllm engine against a stand-in ``vllm`` package that accepts only real argument names.

vLLM cannot be installed here (it needs CUDA and pins its own torch), so the tests replace the
package with a recorder.  The recorder is strict: ``LLM(...)``, ``LLM.generate(...)`` and
``SamplingParams(...)`` raise ``TypeError`` for any keyword the real vLLM does not have, like
the real ones do, so a misspelt or removed argument fails here and not on a GPU machine.

Where the names come from (vLLM's sources, vllm-project/vllm, read for the 0.33 line the
``gpu`` extra installs):

- ``LLM.__init__``'s named parameters: ``vllm/entrypoints/llm.py`` (commit 10fdb8f0d75a);
  its ``**kwargs`` go to ``EngineArgs``, whose dataclass fields are in
  ``vllm/engine/arg_utils.py`` (commit 99d7eb5d6a51) — ``max_model_len``, ``max_num_seqs``
  and ``limit_mm_per_prompt`` are ``EngineArgs`` fields;
- ``LLM.generate(prompts, sampling_params, *, use_tqdm, lora_request, priority,
  tokenization_kwargs)``: same ``llm.py``;
- ``SamplingParams`` fields: ``vllm/sampling_params.py`` (commit 00388f6573cc).

Update the lists together with the ``gpu`` extra's version range in pyproject.toml.
"""

from __future__ import annotations

import sys
import types

import pytest
from PIL import Image

from tasks.models.engines import EngineConfig, GenRequest, make_engine, request_seed
from tasks.models.vllm_llava import vllm_arguments

LLM_PARAMS = frozenset({
    "model", "runner", "convert", "tokenizer", "tokenizer_mode", "skip_tokenizer_init",
    "trust_remote_code", "allowed_local_media_path", "allowed_media_domains",
    "tensor_parallel_size", "dtype", "quantization", "revision", "tokenizer_revision", "seed",
    "gpu_memory_utilization", "swap_space", "cpu_offload_gb", "enforce_eager",
    "enable_return_routed_experts", "disable_custom_all_reduce", "hf_token", "hf_overrides",
    "mm_processor_kwargs", "pooler_config", "structured_outputs_config", "profiler_config",
    "attention_config", "kv_cache_memory_bytes", "compilation_config", "logits_processors",
})
ENGINE_ARGS = frozenset({  # the EngineArgs fields LLM(**kwargs) forwards (a subset of ~150)
    "served_model_name", "hf_config_path", "task", "enable_prompt_embeds", "download_dir",
    "load_format", "config_format", "kv_cache_dtype", "max_model_len",
    "distributed_executor_backend", "pipeline_parallel_size", "data_parallel_size",
    "block_size", "enable_prefix_caching", "disable_sliding_window", "max_num_batched_tokens",
    "max_num_seqs", "max_logprobs", "disable_log_stats", "code_revision", "limit_mm_per_prompt",
    "mm_processor_cache_gb", "enable_lora", "max_loras", "max_lora_rank",
    "enable_chunked_prefill", "generation_config", "override_generation_config",
    "async_scheduling",
})
GENERATE_PARAMS = frozenset({"use_tqdm", "lora_request", "priority", "tokenization_kwargs"})
SAMPLING_PARAMS = frozenset({
    "n", "presence_penalty", "frequency_penalty", "repetition_penalty", "temperature", "top_p",
    "top_k", "min_p", "seed", "stop", "stop_token_ids", "ignore_eos", "max_tokens",
    "min_tokens", "logprobs", "prompt_logprobs", "detokenize", "skip_special_tokens",
    "spaces_between_special_tokens", "include_stop_str_in_output", "output_kind",
    "structured_outputs", "logit_bias", "allowed_token_ids", "extra_args", "bad_words",
})


def _check(where: str, kwargs: dict, allowed: frozenset) -> None:
    unknown = sorted(set(kwargs) - allowed)
    if unknown:
        raise TypeError(f"{where} got unexpected keyword argument(s) {unknown}")


class StrictVllm:
    """Stands in for the ``vllm`` package: records calls, refuses unknown argument names."""

    def __init__(self):
        self.calls: list = []
        rec = self

        class LLM:
            def __init__(self, model, **kwargs):
                _check("LLM()", kwargs, LLM_PARAMS | ENGINE_ARGS)
                rec.calls.append(("LLM", {"model": model, **kwargs}))

            def generate(self, prompts, sampling_params=None, **kwargs):
                _check("LLM.generate()", kwargs, GENERATE_PARAMS)
                rec.calls.append(("generate", prompts, sampling_params))
                out = types.SimpleNamespace(text=" ok ", token_ids=[1, 2])
                return [types.SimpleNamespace(outputs=[out], prompt_token_ids=[0] * 5)
                        for _ in prompts]

        class SamplingParams:
            def __init__(self, **kwargs):
                _check("SamplingParams()", kwargs, SAMPLING_PARAMS)
                self.kwargs = kwargs

        self.module = types.SimpleNamespace(LLM=LLM, SamplingParams=SamplingParams)


@pytest.fixture
def vllm(monkeypatch):
    rec = StrictVllm()
    monkeypatch.setitem(sys.modules, "vllm", rec.module)
    return rec


def test_vllm_request_building(vllm):
    config = EngineConfig("vllm", "llava-hf/llava-1.5-7b-hf", max_new_tokens=32, seed=3,
                          batch_size=2, top_p=0.9, top_k=40, temperature=0.7,
                          max_model_len=2048, gpu_memory_utilization=0.8,
                          tensor_parallel_size=2, max_num_seqs=64, enforce_eager=True)
    engine = make_engine(config)
    image = Image.new("RGB", (336, 336))
    requests = [GenRequest("Is it safe?", image, seed=request_seed(3, 0)),
                GenRequest("Why?", None, seed=request_seed(3, 1)), GenRequest("And here?", image)]
    results = engine.generate(requests)
    assert vllm.calls[0] == ("LLM", {
        "model": "llava-hf/llava-1.5-7b-hf", "limit_mm_per_prompt": {"image": 1}, "seed": 3,
        "dtype": "auto", "gpu_memory_utilization": 0.8, "tensor_parallel_size": 2,
        "enforce_eager": True, "max_model_len": 2048, "max_num_seqs": 64})
    batches = [c for c in vllm.calls if c[0] == "generate"]
    assert [len(b[1]) for b in batches] == [2, 1]
    first = batches[0][1][0]
    assert first["prompt"] == "USER: <image>\nIs it safe? ASSISTANT:"
    assert first["multi_modal_data"]["image"] is image
    assert batches[0][1][1] == {"prompt": "USER: Why? ASSISTANT:"}
    params = [p.kwargs for b in batches for p in b[2]]  # one SamplingParams per request
    same = {"temperature": 0.7, "top_p": 0.9, "top_k": 40, "max_tokens": 32}
    assert params == [same | {"seed": 3}, same | {"seed": 4}, same | {"seed": 3}]
    assert [r.text for r in results] == ["ok"] * 3 and results[0].n_prompt_tokens == 5


def test_optional_knobs_left_to_vllm_defaults(vllm):
    make_engine(EngineConfig("vllm", "m"))
    (_, kwargs), = vllm.calls
    assert "max_model_len" not in kwargs and "max_num_seqs" not in kwargs
    assert kwargs["gpu_memory_utilization"] == 0.9 and kwargs["tensor_parallel_size"] == 1


def test_a_wrong_keyword_fails(vllm, monkeypatch):
    """The stand-in is strict: a misspelt engine argument or sampling field raises."""
    import tasks.models.vllm_llava as mod

    def misspelt(config):
        llm, sampling = vllm_arguments(config)
        return llm | {"gpu_mem_utilization": 0.5}, sampling
    monkeypatch.setattr(mod, "vllm_arguments", misspelt)
    with pytest.raises(TypeError, match="gpu_mem_utilization"):
        make_engine(EngineConfig("vllm", "m"))

    def removed(config):  # best_of was removed from SamplingParams in vLLM's V1 engine
        llm, sampling = vllm_arguments(config)
        return llm, sampling | {"best_of": 2}
    monkeypatch.setattr(mod, "vllm_arguments", removed)
    engine = make_engine(EngineConfig("vllm", "m"))
    (result,) = engine.generate([GenRequest("x")])
    assert result.error.startswith("TypeError") and "best_of" in result.error


def test_every_argument_the_engine_sends_is_recorded():
    config = EngineConfig("vllm", "m", max_model_len=1024, max_num_seqs=8)
    llm, sampling = vllm_arguments(config)
    assert set(llm) - {"model"} <= LLM_PARAMS | ENGINE_ARGS
    assert set(sampling) <= SAMPLING_PARAMS
