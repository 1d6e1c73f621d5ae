"""Answer generation for the query flow: one small interface, engines chosen by name.

The query flow only needs "prompts (+ optional image) in, answers out", but the right backend
depends on the machine: plain transformers works everywhere (CPU included), vLLM is much faster
on a CUDA box but cannot even be installed on CPU-only machines, and a retrieval-only run needs
no model at all.  Keeping them behind one ``generate(requests) -> results`` call, picked from a
registry, lets the flow stay backend-agnostic and lets the CPU test suite exercise the real
transformers path with the tiny checkpoint from ``tasks.models.tiny_llava``.
"""

from __future__ import annotations

import importlib
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
TORCH_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


BOX_CONVENTIONS = ("padded", "per_mille", "pixels")
#: model-name fragments whose VLMs answer with 0–1000 boxes (Qwen-VL family, CogVLM, InternVL);
#: everything else (LLaVA-1.5 and its fine-tunes) answers with fractions of the padded square
_PER_MILLE_MODELS = ("qwen", "cogvlm", "internvl", "minicpm")


@dataclass(frozen=True)
class EngineConfig:
    """Everything an engine is built from: one value the flow builds from settings, passed
    whole to whichever engine the registry picks (and picklable, for Ray actors).

    Sampling is the same in every engine: ``temperature`` 0 is greedy, otherwise both sample
    with ``top_p`` and ``top_k`` (0 = off) set explicitly, and each request carries its own
    seed (``seed`` + the query's position, see ``request_seed``).  The ``vllm_*``-named knobs
    (memory share, tensor parallelism, sequences in flight, eager mode) are vLLM's own;
    ``max_model_len`` (None = the model's context length) also sizes the prompt budget of the
    transformers engine.  ``box_convention`` names how the model writes regions.
    """

    name: str = "transformers"
    model: str = "tiny"
    max_new_tokens: int = 128
    temperature: float = 0.0
    batch_size: int = 8
    device: str | None = None
    dtype: str = "auto"
    seed: int = 0
    adapter: str | None = None
    top_p: float = 1.0
    top_k: int = 0
    max_model_len: int | None = None
    gpu_memory_utilization: float = 0.9
    tensor_parallel_size: int = 1
    max_num_seqs: int | None = None
    enforce_eager: bool = False
    box_convention: str = "padded"


@dataclass
class GenRequest:
    prompt: str  # text prompt WITHOUT the image token; the engine applies the chat template
    image: Image.Image | None = None
    seed: int | None = None  # None = the engine's configured seed


def request_seed(run_seed: int, position: int) -> int:
    """The seed of one request: the run's seed plus the query's position in its file, so a
    sampled answer depends on neither its batch mates nor the replica that ran it."""
    return (int(run_seed) + int(position)) % (2**31)


def box_convention_for(model: str, setting: str = "auto") -> str:
    """``auto`` → the convention the configured model was trained with (see ``BOX_CONVENTIONS``
    and ``tasks.query.boxes``); an explicit setting is checked and kept."""
    if setting != "auto":
        if setting not in BOX_CONVENTIONS:
            raise ValueError(f"unknown box convention {setting!r}; choose one of: auto, "
                             + ", ".join(BOX_CONVENTIONS))
        return setting
    name = str(model).lower()
    return "per_mille" if any(m in name for m in _PER_MILLE_MODELS) else "padded"


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


def model_limits(model: str) -> tuple[int, int]:
    """(context length in tokens, tokens one image takes) from the checkpoint's own config:
    4,096 and 576 for llava-1.5, what the config says for any other LLaVA checkpoint."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model)
    text = getattr(config, "text_config", None) or config
    context = getattr(text, "max_position_embeddings", None) or 4096
    return int(context), int(getattr(config, "image_seq_length", None) or 576)


def load_tokenizer(model: str):
    """The VLM's own tokenizer (prompt budgets are counted with it, not in characters)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model)


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

    def __init__(self, config: EngineConfig | None = None) -> None:
        self.config = config

    def generate(self, requests: list[GenRequest]) -> list[GenResult]:
        return [GenResult(None, None, None, None) for _ in requests]


ENGINES: dict[str, str] = {
    "transformers": "tasks.models.hf_llava:TransformersEngine",
    "vllm": "tasks.models.vllm_llava:VllmEngine",
    "none": "tasks.models.engines:NoneEngine",
}


def resolve_engine(name: str, model: str, cache_dir: str) -> tuple[str, str]:
    """``auto`` → vllm on a CUDA machine with vLLM installed, else transformers;
    ``tiny`` → the locally built random LLaVA (same loading path as a real checkpoint)."""
    import importlib.util

    if name == "auto":
        import torch

        gpu = torch.cuda.is_available() and importlib.util.find_spec("vllm") is not None
        name = "vllm" if gpu else "transformers"
    if model == "tiny":
        from tasks.models.tiny_llava import ensure_tiny_llava

        model = str(ensure_tiny_llava(cache_dir))
    return name, model


def make_engine(config: EngineConfig) -> Engine:
    """Build the engine registered under ``config.name`` (a clear error lists the valid names).

    The registry holds import paths, so choosing ``none`` or ``vllm`` never imports torch's
    transformers stack and a CPU machine never imports vLLM."""
    try:
        target = ENGINES[config.name]
    except KeyError:
        choices = ", ".join(sorted(ENGINES))
        raise ValueError(f"unknown generation engine {config.name!r}; choose one of: "
                         f"{choices}") from None
    if config.adapter and config.name == "vllm":
        raise ValueError(ADAPTER_ENGINE)
    module, cls = target.split(":")
    return getattr(importlib.import_module(module), cls)(config)
