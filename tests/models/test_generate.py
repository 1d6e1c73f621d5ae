"""Generation engines against a real (tiny, random-weight) LLaVA checkpoint, fully offline."""

from __future__ import annotations

import hashlib
import importlib.util
import io
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np
import pytest
from PIL import Image

from tasks.models.engines import (
    ENGINES,
    VLLM_MISSING,
    EngineConfig,
    GenRequest,
    GenResult,
    NoneEngine,
    box_convention_for,
    format_prompt,
    make_engine,
    model_limits,
    request_seed,
)
from tasks.models.hf_llava import TransformersEngine
from tasks.models.tiny_llava import BUILD_NAME, IMAGE_SIZE, PATCH_SIZE, ensure_tiny_llava
from tasks.models.vllm_llava import vllm_inputs

IMAGE_TOKENS = (IMAGE_SIZE // PATCH_SIZE) ** 2  # CLS dropped by the "default" strategy


@pytest.fixture(scope="session")
def tiny_llava(tmp_path_factory):
    return ensure_tiny_llava(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def engine(tiny_llava):
    return make_engine(EngineConfig("transformers", str(tiny_llava), max_new_tokens=8,
                                    batch_size=4))


def _sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _truncated_jpeg() -> Image.Image:
    """Opens fine (header intact) but fails when the pixels are read, like a cut-off download."""
    pixels = np.random.default_rng(0).integers(0, 255, (128, 128, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG")
    return Image.open(io.BytesIO(buf.getvalue()[:2000]))


def _requests() -> list[GenRequest]:
    return [
        GenRequest("Is this street safe?", Image.new("RGB", (64, 48), "red")),
        GenRequest(
            "Describe the city and every building you can see.", Image.new("RGB", (200, 90))
        ),
        GenRequest("What is a tree?", None),
        GenRequest("Is the sky blue?", Image.new("L", (31, 77), 128)),
    ]


def test_tiny_llava_reloads_like_a_real_checkpoint(tiny_llava):
    from transformers import AutoProcessor, LlavaForConditionalGeneration, LlavaProcessor

    assert tiny_llava.name == BUILD_NAME
    processor = AutoProcessor.from_pretrained(tiny_llava)
    model = LlavaForConditionalGeneration.from_pretrained(tiny_llava)
    assert isinstance(processor, LlavaProcessor)
    assert processor.tokenizer.padding_side == "left"
    assert processor.image_token_id == model.config.image_token_id
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi?"}]}]
    rendered = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert rendered == format_prompt("Hi?", has_image=True) == "USER: <image>\nHi? ASSISTANT:"
    assert {"Ġstreet", "Ġsafe", "Ġcity"} <= set(processor.tokenizer.get_vocab())
    size = sum(f.stat().st_size for f in tiny_llava.iterdir())
    assert size < 5_000_000


def test_build_is_cached_and_atomic(tiny_llava):
    before = _sha256(tiny_llava / "model.safetensors"), (tiny_llava / "config.json").stat().st_mtime
    assert ensure_tiny_llava(tiny_llava.parent) == tiny_llava
    after = _sha256(tiny_llava / "model.safetensors"), (tiny_llava / "config.json").stat().st_mtime
    assert before == after
    assert [p.name for p in tiny_llava.parent.iterdir()] == [BUILD_NAME]  # no temp leftovers


def test_build_is_deterministic_per_seed(tiny_llava, tmp_path):
    again = ensure_tiny_llava(tmp_path / "a", seed=0)
    other = ensure_tiny_llava(tmp_path / "b", seed=1)
    for name in ("model.safetensors", "tokenizer.json"):
        assert _sha256(again / name) == _sha256(tiny_llava / name)
    assert _sha256(other / "model.safetensors") != _sha256(tiny_llava / "model.safetensors")
    assert other.name == f"{BUILD_NAME}-seed1"


def test_batched_generation_of_mixed_requests(engine):
    results = engine.generate(_requests())
    assert len(results) == 4
    for result in results:
        assert result.error is None and result.text is not None
        assert result.n_prompt_tokens > 0 and 0 < result.n_generated_tokens <= 8


def test_generated_tokens_stop_at_first_eos(engine):
    tokenizer = engine.processor.tokenizer
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    words = tokenizer("street city", add_special_tokens=False).input_ids
    result = engine._result([*words, eos, pad, pad], n_prompt=7)
    assert result.n_generated_tokens == len(words) + 1
    assert result.text == "street city" and result.n_prompt_tokens == 7


def test_image_adds_its_placeholder_tokens(engine):
    prompt, tokenizer = "Is it safe?", engine.processor.tokenizer
    with_image, without = engine.generate(
        [GenRequest(prompt, Image.new("RGB", (40, 40))), GenRequest(prompt, None)]
    )
    n_with = len(tokenizer(format_prompt(prompt, True)).input_ids)  # one <image> placeholder
    assert with_image.n_prompt_tokens == n_with - 1 + IMAGE_TOKENS
    assert without.n_prompt_tokens == len(tokenizer(format_prompt(prompt, False)).input_ids)


def test_batched_equals_one_at_a_time(engine):
    requests = _requests()
    batched = engine.generate(requests)
    alone = [engine.generate([r])[0] for r in requests]
    assert batched == alone


@pytest.mark.parametrize("bad", [Image.new("RGB", (0, 0)), "bad", "truncated"])
def test_bad_request_fails_alone(engine, bad):
    bad_image = _truncated_jpeg() if bad == "truncated" else bad
    requests = _requests()
    requests.insert(1, GenRequest("broken", bad_image))
    results = engine.generate(requests[:4])  # one batch of 4 holding the bad one
    assert results[1].text is None and results[1].error
    assert results[1].n_prompt_tokens is None
    good = [results[0], *results[2:]]
    assert all(r.error is None and r.text is not None for r in good)
    assert good == engine.generate([requests[0], *requests[2:4]])


def test_string_image_is_rejected_not_fetched(engine):
    (result,) = engine.generate([GenRequest("x", "https://example.invalid/a.jpg")])
    assert result.error.startswith("TypeError")


def test_image_token_in_prompt_is_neutralised(engine):
    assert format_prompt("a <image> b", has_image=False) == "USER: a  b ASSISTANT:"
    (result,) = engine.generate([GenRequest("caption: <image> on a street", None)])
    assert result.error is None


def test_sampling_is_reproducible_with_seed(tiny_llava):
    def run(seed):
        eng = make_engine(EngineConfig(
            "transformers", str(tiny_llava), max_new_tokens=6, temperature=1.0, seed=seed
        ))
        return eng.generate(_requests()[:2])

    assert run(3) == run(3)


def test_registry_picks_by_name(tiny_llava):
    assert set(ENGINES) == {"transformers", "vllm", "none"}
    assert isinstance(make_engine(EngineConfig("none", "unused")), NoneEngine)
    assert (
        make_engine(EngineConfig("none", "unused")).generate(_requests()[:2])
        == [GenResult(None, None, None, None)] * 2
    )
    engine = make_engine(EngineConfig("transformers", str(tiny_llava), max_new_tokens=2))
    assert isinstance(engine, TransformersEngine) and engine.name == "transformers"


def test_unknown_engine_lists_choices():
    with pytest.raises(ValueError, match="choose one of: none, transformers, vllm"):
        make_engine(EngineConfig("llama.cpp", "m"))


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vllm is installed")
def test_vllm_engine_without_vllm_explains(tiny_llava):
    with pytest.raises(RuntimeError) as err:
        make_engine(EngineConfig("vllm", str(tiny_llava)))
    assert str(err.value) == VLLM_MISSING


def test_vllm_inputs_follow_llava15_format():
    image = Image.new("RGB", (8, 8))
    with_image, text_only = vllm_inputs([GenRequest("What?", image), GenRequest("Why?", None)])
    assert with_image == {
        "prompt": "USER: <image>\nWhat? ASSISTANT:",
        "multi_modal_data": {"image": image},
    }
    assert text_only == {"prompt": "USER: Why? ASSISTANT:"}


def test_sampling_is_explicit_and_seeded_per_request(tiny_llava):
    """temperature, top_p and top_k reach generate() explicitly (the checkpoint's own top_k=50
    would otherwise apply); each request samples under its own seed, so its answer does not
    depend on its batch mates."""
    from tasks.models.hf_llava import generation_kwargs

    config = EngineConfig("transformers", str(tiny_llava), max_new_tokens=6, temperature=1.0,
                          top_p=0.95, top_k=0, batch_size=4)
    kwargs = generation_kwargs(config, 3)
    assert kwargs == {"max_new_tokens": 6, "do_sample": True, "pad_token_id": 3,
                      "temperature": 1.0, "top_p": 0.95, "top_k": 0}
    assert generation_kwargs(EngineConfig(temperature=0.0), 3) == {
        "max_new_tokens": 128, "do_sample": False, "pad_token_id": 3}
    engine = make_engine(config)
    requests = [GenRequest(r.prompt, r.image, seed=request_seed(7, i))
                for i, r in enumerate(_requests())]
    together = engine.generate(requests)
    alone = [engine.generate([r])[0] for r in requests]
    shuffled = engine.generate(requests[::-1])[::-1]
    assert together == alone == shuffled
    reseeded = engine.generate([GenRequest(r.prompt, r.image, seed=request_seed(8, i))
                                for i, r in enumerate(_requests())])
    assert [r.text for r in reseeded] != [r.text for r in together]


def test_request_seed_is_run_seed_plus_position():
    assert [request_seed(10, i) for i in range(3)] == [10, 11, 12]
    assert 0 <= request_seed(2**31 - 1, 5) < 2**31


def test_model_limits_come_from_the_checkpoint(tiny_llava):
    assert model_limits(str(tiny_llava)) == (4096, IMAGE_TOKENS)


def test_prompt_past_the_context_fails_alone(tiny_llava):
    """The transformers engine refuses a prompt that would run past the model's context (its
    attention memory grows with the square of the length) instead of running it."""
    engine = make_engine(EngineConfig("transformers", str(tiny_llava), max_new_tokens=4,
                                      max_model_len=64, batch_size=3))
    long = GenRequest("street " * 200, None)
    ok, bad, ok2 = engine.generate([_requests()[2], long, _requests()[2]])
    assert ok.error is None and ok2.error is None and ok == ok2
    assert bad.text is None and "exceeds the model's context of 64 tokens" in bad.error


@pytest.mark.parametrize("model, setting, expected", [
    ("llava-hf/llava-1.5-7b-hf", "auto", "padded"),
    ("/models/tiny-llava-v1", "auto", "padded"),
    ("Qwen/Qwen2-VL-7B-Instruct", "auto", "per_mille"),
    ("llava-hf/llava-1.5-7b-hf", "pixels", "pixels"),
])
def test_box_convention_default_follows_the_model(model, setting, expected):
    assert box_convention_for(model, setting) == expected


def test_unknown_box_convention_is_refused():
    with pytest.raises(ValueError, match="choose one of: auto, padded, per_mille, pixels"):
        box_convention_for("m", "inches")
