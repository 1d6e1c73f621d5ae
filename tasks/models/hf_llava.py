"""LLaVA through plain transformers: the engine that runs anywhere (CPU included), and the
one the CPU test suite exercises with the tiny checkpoint from ``tasks.models.tiny_llava``.

Sampling matches the vLLM engine: temperature, top_p and top_k are passed explicitly (the
checkpoint's generation config would otherwise add its own ``top_k=50``), and each request is
seeded with its own seed.  ``generate`` draws from one global generator for a whole batch, so
sampled requests run one at a time under their seed; greedy requests are batched."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tasks.models.engines import (
    TORCH_DTYPES,
    EngineConfig,
    GenRequest,
    GenResult,
    check_image,
    chunks,
    format_prompt,
    run_with_fallback,
)


def generation_kwargs(config: EngineConfig, pad_token_id: int | None) -> dict[str, Any]:
    """Greedy at temperature 0 (reproducible answers), otherwise sampling with temperature,
    top_p and top_k all explicit (top_k 0 = off, as in vLLM)."""
    kwargs: dict[str, Any] = {"max_new_tokens": config.max_new_tokens,
                              "do_sample": config.temperature > 0, "pad_token_id": pad_token_id}
    if config.temperature > 0:
        kwargs |= {"temperature": config.temperature, "top_p": config.top_p,
                   "top_k": config.top_k}
    return kwargs


class TransformersEngine:
    """LLaVA through plain transformers: runs anywhere, batched with left padding."""

    name = "transformers"

    def __init__(self, config: EngineConfig) -> None:
        import torch
        from transformers import AutoProcessor, LlavaForConditionalGeneration

        model, dtype, adapter = config.model, config.dtype, config.adapter
        self.device = config.device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.batch_size, self.seed = config.batch_size, config.seed
        self.processor = AutoProcessor.from_pretrained(model)
        self.processor.tokenizer.padding_side = "left"  # right padding breaks batched generation
        torch_dtype = TORCH_DTYPES.get(dtype, dtype)
        self.model = LlavaForConditionalGeneration.from_pretrained(model, dtype=torch_dtype)
        if self.device == "cpu" and dtype == "auto" and self.model.dtype == torch.float16:
            self.model = self.model.to(torch.bfloat16)  # fp16 is slow on CPU; bf16 is not
        if adapter:  # merged once at load: generation then costs what the base model costs
            from peft import PeftModel

            self.model = PeftModel.from_pretrained(self.model, adapter).merge_and_unload()
        self.model = self.model.to(self.device).eval()
        text_config = getattr(self.model.config, "text_config", self.model.config)
        positions = text_config.max_position_embeddings
        self.context = min(config.max_model_len or positions, positions)
        self.max_new_tokens = config.max_new_tokens
        self.sampling = config.temperature > 0
        self.gen_kwargs = generation_kwargs(config, self.processor.tokenizer.pad_token_id)

    def generate(self, requests: list[GenRequest]) -> list[GenResult]:
        results: list[GenResult] = []
        size = 1 if self.sampling else self.batch_size  # one seed per request when sampling
        for batch in chunks(requests, size):
            results.extend(run_with_fallback(batch, self._generate_batch))
        return results

    def _encode(self, batch: Sequence[GenRequest]):
        """Chat-formatted, left-padded inputs; images only for the requests that have one."""
        for request in batch:
            check_image(request)
        token = self.processor.image_token
        texts = [format_prompt(r.prompt, r.image is not None, token) for r in batch]
        images = [r.image for r in batch if r.image is not None]
        inputs = self.processor(
            images=images or None, text=texts, return_tensors="pt", padding=True
        )
        return inputs.to(self.device, self.model.dtype)

    def _generate_batch(self, batch: Sequence[GenRequest]) -> list[GenResult]:
        import torch

        inputs = self._encode(batch)
        width = inputs["input_ids"].shape[1]
        if width + self.max_new_tokens > self.context:  # a batch fails; its culprit fails alone
            raise ValueError(f"prompt of {width} tokens + {self.max_new_tokens} new tokens "
                             f"exceeds the model's context of {self.context} tokens")
        seed = batch[0].seed if batch[0].seed is not None else self.seed
        torch.manual_seed(seed)  # sampled batches hold one request: its own seed
        with torch.inference_mode():
            output = self.model.generate(**inputs, **self.gen_kwargs)
        new_tokens = output[:, inputs["input_ids"].shape[1] :].tolist()
        prompt_lengths = inputs["attention_mask"].sum(dim=1).tolist()
        return [self._result(row, n) for row, n in zip(new_tokens, prompt_lengths, strict=True)]

    def _result(self, new_tokens: list[int], n_prompt: int) -> GenResult:
        """Decode only the new tokens, stopping at the first end-of-sequence (then padding)."""
        eos = self.model.generation_config.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [eos])
        n_new = next((i + 1 for i, t in enumerate(new_tokens) if t in eos_ids), len(new_tokens))
        text = self.processor.decode(new_tokens[:n_new], skip_special_tokens=True).strip()
        return GenResult(text, None, int(n_prompt), n_new)
