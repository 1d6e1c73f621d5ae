"""GPU memory a LoRA / QLoRA run holds for weights, LoRA parameters, gradients and optimizer
state, computed from parameter counts: the model is built from its configuration on the meta
device (no weights are read or allocated) and its parameters are counted by kind.

These are computed figures, not measurements.  Activations are not included: they depend on
the batch, the sequence length (576 image tokens + the text for llava-1.5) and gradient
checkpointing, and are best read from a measured run (``torch.cuda.max_memory_allocated``).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

from tasks.adapt.finetune import LM_MODULES, lm_target_regex

GIB = 2**30
#: NF4 with double quantisation (bitsandbytes, block 64): 4 bits per weight, one 8-bit absmax
#: per 64 weights and one fp32 constant per 256 absmax blocks
NF4_BITS = 4 + 8 / 64 + 32 / (64 * 256)
ADAM_BYTES = 4 + 4 + 4 + 4  # fp32 trainable weight, its gradient, Adam's two moments


def llava_15_7b_config():
    """The architecture of ``llava-hf/llava-1.5-7b-hf`` (its config.json: Vicuna-7B v1.5 =
    Llama 7B with a 32,064-token vocabulary, CLIP ViT-L/14 at 336 px), without the download."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    text = LlamaConfig(vocab_size=32064, hidden_size=4096, intermediate_size=11008,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                       max_position_embeddings=4096, rms_norm_eps=1e-5)
    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                              num_attention_heads=16, image_size=336, patch_size=14,
                              projection_dim=768)
    return LlavaConfig(text_config=text, vision_config=vision, image_token_index=32000,
                       projector_hidden_act="gelu", vision_feature_layer=-2,
                       vision_feature_select_strategy="default")


@dataclass(frozen=True)
class ParameterCounts:
    total: int
    lm_linear: int  # the language model's nn.Linear weights: what 4-bit loading quantises
    lora: int  # LoRA A + B for the targeted projections at the given rank


def count_parameters(config, rank: int = 8, targets: tuple[str, ...] = LM_MODULES
                     ) -> ParameterCounts:
    import torch
    from accelerate import init_empty_weights
    from transformers import LlavaForConditionalGeneration

    with init_empty_weights():
        model = LlavaForConditionalGeneration(config)
    total = sum(p.numel() for p in model.parameters())
    target = re.compile(lm_target_regex(tuple(targets)))
    lm_linear = lora = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and ".language_model." in f".{name}.":
            lm_linear += module.weight.numel()
            if target.fullmatch(name):
                lora += rank * (module.in_features + module.out_features)
    return ParameterCounts(total, lm_linear, lora)


def estimate(counts: ParameterCounts, load_in_4bit: bool) -> dict:
    """GiB on each GPU (every DDP process holds a full copy) for the parameters only.

    LoRA: frozen weights in fp16 (2 bytes).  QLoRA: the language model's linear weights in NF4
    and everything else in fp32 (``prepare_model_for_kbit_training`` upcasts the non-quantised
    weights: embeddings, ``lm_head``, norms, vision tower, projector).  Both: LoRA weights,
    gradients and AdamW moments in fp32 (16 bytes per trainable parameter)."""
    if load_in_4bit:
        frozen = counts.lm_linear * NF4_BITS / 8 + (counts.total - counts.lm_linear) * 4
    else:
        frozen = counts.total * 2
    trainable = counts.lora * ADAM_BYTES
    return {"frozen_weights_gib": round(frozen / GIB, 2),
            "lora_and_optimizer_gib": round(trainable / GIB, 2),
            "total_gib": round((frozen + trainable) / GIB, 2)} | asdict(counts)


def activations_estimate(config, batch: int, seq_len: int, checkpointing: bool) -> dict:
    """An estimate, not a measurement: bytes of activations kept for the backward pass of the
    language model in 16-bit training, after Korthikanti et al. 2022 ("Reducing Activation
    Recomputation in Large Transformer Models", eq. 1): ``34·s·b·h`` per layer, without the
    ``5·a·s²·b`` attention-score term (SDPA/flash attention keeps no score matrix).  With
    gradient checkpointing each layer keeps its 16-bit input (``2·s·b·h``) and one layer at a
    time is recomputed in full.  Plus the logits: fp32 for the loss and their gradient
    (``2·4·s·b·V``).  The vision tower (frozen, 577 tokens per image) and LoRA's own inputs add
    a little on top."""
    text = config.text_config
    s, b, h, n = seq_len, batch, text.hidden_size, text.num_hidden_layers
    layer = 34 * s * b * h
    kept = (2 * s * b * h * n + layer) if checkpointing else layer * n
    logits = 2 * 4 * s * b * text.vocab_size
    return {"layers_gib": round(kept / GIB, 2), "logits_gib": round(logits / GIB, 2),
            "total_gib": round((kept + logits) / GIB, 2)}
