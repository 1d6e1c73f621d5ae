"""Answer generation for the query flow: one small interface, engines chosen by name.

The query flow only needs "prompts (+ optional image) in, answers out", but the right backend
depends on the machine: plain transformers works everywhere (CPU included), vLLM is much faster
on a CUDA box but cannot even be installed on CPU-only machines, and a retrieval-only run needs
no model at all.  Keeping them behind one ``generate(requests) -> results`` call, picked from a
registry, lets the flow stay backend-agnostic and lets the CPU test suite exercise the real
transformers path with the tiny checkpoint from ``tasks.tiny_llava``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from PIL import Image

log = logging.getLogger(__name__)

VLLM_MISSING = "the vllm engine needs the 'gpu' extra: pip install 'mmrag[gpu]' on a CUDA machine"
ADAPTER_ENGINE = ("a LoRA adapter (MMRAG_VLM_ADAPTER) is applied by the transformers engine only; "
                  "for vllm, merge it (mmrag finetune --merge) and set MMRAG_VLM_MODEL to the "
                  "merged folder")
IMAGE_TOKEN = "<image>"  # noqa: S105 - a placeholder token, not a secret
_TORCH_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


@dataclass
class GenRequest:
    prompt: str  # text prompt WITHOUT the image token; the engine applies the chat template
    image: Image.Image | None = None


@dataclass
class GenResult:
    text: str | None
    error: str | None
    n_prompt_tokens: int | None
    n_generated_tokens: int | None

    @classmethod
    def failed(cls, exc: BaseException) -> GenResult:
        return cls(None, f"{type(exc).__name__}: {exc}", None, None)


class Engine(Protocol):
    name: str

    def generate(self, requests: list[GenRequest]) -> list[GenResult]: ...


def format_prompt(prompt: str, has_image: bool, image_token: str = IMAGE_TOKEN) -> str:
    """The llava-1.5 conversation format, shared by every engine so answers are comparable.

    Matches what the llava-1.5-hf chat template renders for one user turn (image first, then
    text) plus the generation prompt.  Text-only requests simply omit the image placeholder, and
    placeholders inside the prompt (e.g. from retrieved captions) are removed: each would claim
    an image that does not exist.
    """
    image_part = f"{image_token}\n" if has_image else ""
    text = prompt.replace(image_token, "")  # a stray placeholder in retrieved text breaks the batch
    return f"USER: {image_part}{text} ASSISTANT:"


def check_image(request: GenRequest) -> None:
    """Only PIL images reach the processors: given a string they fetch URLs or read files."""
    if request.image is not None and not isinstance(request.image, Image.Image):
        raise TypeError(f"image must be a PIL.Image.Image or None, not {type(request.image)}")


def chunks(items: Sequence[Any], size: int) -> list[Sequence[Any]]:
    """Fixed-size slices: bounds memory per model call and the blast radius of a bad input."""
    return [items[i : i + size] for i in range(0, len(items), max(1, size))]


def run_with_fallback(
    batch: Sequence[GenRequest], run: Callable[[Sequence[GenRequest]], list[GenResult]]
) -> list[GenResult]:
    """Run a batch; if it raises, rerun request by request so only the culprit gets the error.

    One undecodable image must not cost the other answers of its batch; the retry is only paid
    in the (rare) failing case.
    """
    try:
        return run(batch)
    except Exception as exc:
        if len(batch) == 1:
            return [GenResult.failed(exc)]
        log.warning("batch of %d failed (%s); retrying one at a time", len(batch), exc)
    results = []
    for request in batch:
        try:
            results.extend(run([request]))
        except Exception as exc:
            results.append(GenResult.failed(exc))
    return results


class NoneEngine:
    """Retrieval only: no model is loaded and every result is empty (text and error None)."""

    name = "none"

    def __init__(self, model: str | None = None, **_: Any) -> None:
        self.model = model

    def generate(self, requests: list[GenRequest]) -> list[GenResult]:
        return [GenResult(None, None, None, None) for _ in requests]


class TransformersEngine:
    """LLaVA through plain transformers: runs anywhere, batched with left padding."""

    name = "transformers"

    def __init__(
        self,
        model: str,
        *,
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        batch_size: int = 8,
        device: str | None = None,
        dtype: str = "auto",
        seed: int = 0,
        adapter: str | None = None,
    ) -> None:
        import torch
        from transformers import AutoProcessor, LlavaForConditionalGeneration

        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.batch_size, self.seed = batch_size, seed
        self.processor = AutoProcessor.from_pretrained(model)
        self.processor.tokenizer.padding_side = "left"  # right padding breaks batched generation
        torch_dtype = _TORCH_DTYPES.get(dtype, dtype)
        self.model = LlavaForConditionalGeneration.from_pretrained(model, dtype=torch_dtype)
        if self.device == "cpu" and dtype == "auto" and self.model.dtype == torch.float16:
            self.model = self.model.to(torch.bfloat16)  # fp16 is slow on CPU; bf16 is not
        if adapter:  # merged once at load: generation then costs what the base model costs
            from peft import PeftModel

            self.model = PeftModel.from_pretrained(self.model, adapter).merge_and_unload()
        self.model = self.model.to(self.device).eval()
        self.gen_kwargs = self._generation_kwargs(max_new_tokens, temperature)

    def _generation_kwargs(self, max_new_tokens: int, temperature: float) -> dict[str, Any]:
        """Greedy at temperature 0 (reproducible answers), sampling otherwise."""
        kwargs: dict[str, Any] = {
            "max_new_tokens": max_new_tokens,
            "do_sample": temperature > 0,
            "pad_token_id": self.processor.tokenizer.pad_token_id,
        }
        if temperature > 0:
            kwargs["temperature"] = temperature
        return kwargs

    def generate(self, requests: list[GenRequest]) -> list[GenResult]:
        results: list[GenResult] = []
        for batch in chunks(requests, self.batch_size):
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
        torch.manual_seed(self.seed)  # sampling is reproducible per batch
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


def vllm_arguments(model: str, max_new_tokens: int, temperature: float, seed: int,
                   dtype: str) -> tuple[dict, dict]:
    """What the vLLM engine passes to ``LLM(...)`` and ``SamplingParams(...)``: one image per
    prompt (the grid), fixed seed, greedy at temperature 0."""
    llm = {"model": model, "limit_mm_per_prompt": {"image": 1}, "seed": seed,
           "dtype": _TORCH_DTYPES.get(dtype, dtype)}
    sampling = {"temperature": temperature, "max_tokens": max_new_tokens, "seed": seed}
    return llm, sampling


class VllmEngine:
    """LLaVA through vLLM (GPU extra only): continuous batching, much higher throughput on CUDA.

    ``device`` is ignored (vLLM picks its platform); ``batch_size`` is how many requests go to
    vLLM per call, which then schedules them itself, so use a large value on a GPU.
    """

    name = "vllm"

    def __init__(
        self,
        model: str,
        *,
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        batch_size: int = 8,
        device: str | None = None,
        dtype: str = "auto",
        seed: int = 0,
    ) -> None:
        try:
            from vllm import LLM, SamplingParams
        except ImportError as exc:
            raise RuntimeError(VLLM_MISSING) from exc
        self.batch_size = batch_size
        llm_kwargs, sampling_kwargs = vllm_arguments(model, max_new_tokens, temperature, seed,
                                                     dtype)
        self.llm = LLM(**llm_kwargs)
        self.params = SamplingParams(**sampling_kwargs)

    def generate(self, requests: list[GenRequest]) -> list[GenResult]:
        results: list[GenResult] = []
        for batch in chunks(requests, self.batch_size):
            results.extend(run_with_fallback(batch, self._generate_batch))
        return results

    def _generate_batch(self, batch: Sequence[GenRequest]) -> list[GenResult]:
        outputs = self.llm.generate(vllm_inputs(batch), self.params, use_tqdm=False)
        return [
            GenResult(
                o.outputs[0].text.strip(),
                None,
                len(o.prompt_token_ids),
                len(o.outputs[0].token_ids),
            )
            for o in outputs
        ]


ENGINES: dict[str, type] = {
    "transformers": TransformersEngine,
    "vllm": VllmEngine,
    "none": NoneEngine,
}


def make_engine(
    name: str,
    model: str,
    *,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    batch_size: int = 8,
    device: str | None = None,
    dtype: str = "auto",
    seed: int = 0,
    adapter: str | None = None,
) -> Engine:
    """Build the engine registered under ``name`` (a clear error lists the valid names)."""
    try:
        cls = ENGINES[name]
    except KeyError:
        choices = ", ".join(sorted(ENGINES))
        raise ValueError(f"unknown generation engine {name!r}; choose one of: {choices}") from None
    if adapter and name == "vllm":
        raise ValueError(ADAPTER_ENGINE)
    extra = {"adapter": adapter} if adapter and name == "transformers" else {}
    return cls(
        model,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        batch_size=batch_size,
        device=device,
        dtype=dtype,
        seed=seed,
        **extra,
    )
