"""Build a tiny random-weight LLaVA checkpoint that loads exactly like ``llava-hf/llava-1.5-7b-hf``.

Model hubs are unreachable here and a real LLaVA is 14 GB, yet the query flow must run end to end
in tests, CI and offline demos.  This module trains a small BPE tokenizer on a built-in corpus and
saves a tiny ``LlavaForConditionalGeneration`` + ``LlavaProcessor`` (with a llava-1.5 chat
template) through ``save_pretrained``, so every consumer goes through the same ``from_pretrained``
path as with a real checkpoint.  Its answers are gibberish by construction; its shapes, token
accounting and batching behaviour are real.
"""

from __future__ import annotations

from pathlib import Path

from tasks.io import atomic

BUILD_NAME = "tiny-llava-v1"
IMAGE_TOKEN = "<image>"  # noqa: S105 - a placeholder token, not a secret
IMAGE_SIZE = 32
PATCH_SIZE = 8
VOCAB_SIZE = 600
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", IMAGE_TOKEN]

# Same rendering as the llava-1.5-hf template: "USER: <image>\n{prompt} ASSISTANT:".
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' ' }}{% endfor %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

_CORPUS = """
USER: ASSISTANT: What is in this image? Describe the image. Is this place safe?
The street is busy with cars, buses and people walking on the sidewalk.
A tall building stands in the city centre under a clear blue sky.
A green tree grows next to a red car parked on the quiet street.
The city at night is bright with lights from every building and shop.
Is it safe to walk here? The road looks safe, with a crossing and traffic lights.
Two dogs play in the park near a large tree and a wooden bench.
A woman rides a bicycle along the river while clouds move across the sky.
The photo shows a kitchen with a white table, four chairs and a window.
There is a yellow taxi, a blue truck and a small car at the intersection.
Children are playing football in a field behind the old school building.
The mountain is covered with snow and the sky is grey and cloudy.
A man is holding an umbrella because it is raining in the city.
The beach has white sand, blue water and people under umbrellas.
A train crosses the bridge over the river near the station.
The market street is full of fruit, vegetables, flowers and people.
This image contains a cat sleeping on a sofa next to a lamp.
The answer is yes. The answer is no. I do not know. It looks like a street.
"""


def _train_tokenizer():
    """A byte-level BPE tokenizer trained locally, wrapped as a fast HF tokenizer (left padding)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS[0]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([line for line in _CORPUS.splitlines() if line], trainer=trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        **dict(
            zip(("unk_token", "bos_token", "eos_token", "pad_token"), SPECIAL_TOKENS, strict=False)
        ),
        extra_special_tokens={"image_token": IMAGE_TOKEN},
        padding_side="left",
    )


def _build_processor(tokenizer):
    """Processor whose crop size equals the vision tower's input and which knows the patch size."""
    from transformers import CLIPImageProcessor, LlavaProcessor

    image_processor = CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # the CLIP CLS token
        chat_template=CHAT_TEMPLATE,
    )


def _build_model(tokenizer, seed: int):
    """Tiny CLIP vision tower + tiny Llama, random weights drawn under ``seed``."""
    import torch
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )

    vision = CLIPVisionConfig(
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        projection_dim=32,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        image_seq_length=(IMAGE_SIZE // PATCH_SIZE) ** 2,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def ensure_tiny_llava(cache_dir: str | Path, seed: int = 0) -> Path:
    """Return the tiny LLaVA folder under ``cache_dir``, building it once (atomically) if missing.

    The build goes to a temporary sibling folder and is renamed into place, so a crashed or
    concurrent build never leaves a half-written checkpoint behind.  Seed 0 lives in
    ``tiny-llava-v1``; other seeds get their own folder so caches never mix weights.
    """
    cache_dir = Path(cache_dir)
    name = BUILD_NAME if seed == 0 else f"{BUILD_NAME}-seed{seed}"
    target = cache_dir / name
    if (target / "config.json").is_file():
        return target
    with atomic.atomic_path(target, folder=True, keep_existing=True) as tmp:
        tokenizer = _train_tokenizer()
        _build_processor(tokenizer).save_pretrained(tmp)
        _build_model(tokenizer, seed).save_pretrained(tmp)
    return target
