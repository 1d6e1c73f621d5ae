"""LoRA fine-tuning of a LLaVA checkpoint on an exported instruction dataset.

A plain torch loop rather than ``transformers.Trainer``: the model, one collate function and
AdamW are all LoRA on LLaVA needs, and every step (masking, accumulation, checkpoints, merge)
stays visible and testable on CPU with the tiny LLaVA.

Only the language model's attention and MLP projections get LoRA adapters by default; the
vision tower and the projector stay frozen unless asked (``unfreeze_vision_layers``,
``train_projector``: those modules are trained in full and saved with the adapter).  Batches
come from ``tasks.adapt.collate`` (labels on the gpt turns only).
"""

from __future__ import annotations

import json
import logging
import math
import random
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from schemas.instructions import IMAGES_DIR
from tasks.adapt.collate import IGNORE, batches
from tasks.adapt.export import load_split
from tasks.io import atomic

log = logging.getLogger(__name__)
LM_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTER_DIR, MERGED_DIR, CHECKPOINTS_DIR = "adapter", "merged", "checkpoints"
SUMMARY = "finetune.json"


class FinetuneError(Exception):
    """A fatal problem with the dataset or the configuration."""


@dataclass
class FinetuneConfig:
    base: str = "llava-hf/llava-1.5-7b-hf"
    rank: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: tuple[str, ...] = LM_MODULES
    unfreeze_vision_layers: int = 0
    train_projector: bool = False
    epochs: int = 1
    max_steps: int | None = None  # optimizer steps; overrides epochs
    lr: float = 2e-4
    batch_size: int = 4
    grad_accum: int = 4
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    max_length: int = 2048
    save_steps: int | None = None
    max_eval: int = 256
    precision: str = "auto"  # auto = bf16 on CUDA with bf16 support, else fp32
    gradient_checkpointing: bool = False
    merge: bool = False
    seed: int = 0

    def check(self) -> None:
        """Bad values fail before a model is loaded, with the option's name."""
        positive = ("rank", "alpha", "epochs", "batch_size", "grad_accum", "max_length")
        bad = [k for k in positive if getattr(self, k) < 1]
        bad += [k for k in ("max_steps", "save_steps") if getattr(self, k) is not None
                and getattr(self, k) < 1]
        bad += ["lr"] * (self.lr <= 0) + ["dropout"] * (not 0 <= self.dropout < 1)
        bad += ["warmup_ratio"] * (not 0 <= self.warmup_ratio < 1)
        bad += ["precision"] * (self.precision not in ("auto", "fp32", "bf16"))
        bad += ["target_modules"] * (not self.target_modules)
        if bad:
            raise FinetuneError("invalid value for " + ", ".join(
                f"--{k.replace('_', '-')}" for k in bad))


def resolve_base(base: str, cache_dir: str) -> str:
    """``tiny`` → the locally built random LLaVA, as for the query engine."""
    if base == "tiny":
        from tasks.models.tiny_llava import ensure_tiny_llava

        return str(ensure_tiny_llava(cache_dir))
    return base


def lm_target_regex(names: tuple[str, ...]) -> str:
    """Projections inside the language model only: the vision tower has q/k/v_proj too."""
    return r".*language_model\..*\.(" + "|".join(re.escape(n) for n in names) + r")"


def vision_layer_names(model, n: int) -> list[str]:
    """Module names of the last ``n`` vision layers whose output LLaVA actually uses.

    LLaVA reads the features of ``vision_feature_layer`` (llava-1.5: the penultimate layer), so
    the layers after it never receive a gradient: "last" counts back from the feature layer."""
    if n <= 0:
        return []
    layers = {int(m.group(2)): m.group(0) for name, _ in model.named_modules()
              if (m := re.fullmatch(r"(.*vision_tower\..*layers)\.(\d+)", name))}
    feature = model.config.vision_feature_layer
    feature = max(feature) if isinstance(feature, list | tuple) else feature
    used = len(layers) + 1 + feature if feature < 0 else feature  # hidden_states[0] = embeddings
    if n > used:
        raise FinetuneError(f"--unfreeze-vision-layers {n}: the vision tower feeds LLaVA from "
                            f"its first {used} layers")
    return [layers[i] for i in range(used - n, used)]


def build_model(cfg: FinetuneConfig, base: str, device: str):
    """The base model with LoRA adapters; everything else frozen."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlavaForConditionalGeneration

    bf16 = device == "cuda" and torch.cuda.is_bf16_supported()
    dtype = {"auto": torch.bfloat16 if bf16 else torch.float32, "fp32": torch.float32,
             "bf16": torch.bfloat16}[cfg.precision]
    model = LlavaForConditionalGeneration.from_pretrained(base, dtype=dtype)
    model.config.use_cache = False
    save = vision_layer_names(model, cfg.unfreeze_vision_layers)
    save += ["multi_modal_projector"] if cfg.train_projector else []
    lora = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                      target_modules=lm_target_regex(tuple(cfg.target_modules)),
                      modules_to_save=save or None, bias="none")
    try:
        model = get_peft_model(model, lora)
    except ValueError as e:  # target modules that match nothing
        raise FinetuneError(f"LoRA targets: {e}") from e
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.to(device)


def evaluate(model, records, processor, images_dir: Path, cfg: FinetuneConfig,
             device: str) -> float | None:
    """Token-weighted mean loss over (up to ``max_eval``) validation records."""
    import torch

    if not records:
        return None
    total, tokens = 0.0, 0
    model.eval()
    with torch.inference_mode():
        for batch in batches(records[: cfg.max_eval], processor, images_dir, cfg.batch_size,
                             cfg.max_length, None):
            n = int((batch["labels"][:, 1:] != IGNORE).sum())
            total += float(model(**_to(batch, device, model.dtype)).loss) * n
            tokens += n
    model.train()
    return total / max(tokens, 1)


def _to(batch: dict, device: str, dtype) -> dict:
    out = {k: v.to(device) for k, v in batch.items()}
    out["pixel_values"] = out["pixel_values"].to(dtype)
    return out


def total_steps(n_records: int, cfg: FinetuneConfig) -> int:
    per_epoch = math.ceil(math.ceil(n_records / cfg.batch_size) / cfg.grad_accum)
    return cfg.max_steps if cfg.max_steps else max(1, per_epoch * cfg.epochs)


def train(model, records, processor, images_dir: Path, cfg: FinetuneConfig, device: str,
          on_step: Callable[[int, float], None]) -> list[float]:
    """AdamW + linear warmup/decay over ``total_steps``; one loss per optimizer step."""
    import torch
    from transformers import get_scheduler

    steps = total_steps(len(records), cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    optim = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = get_scheduler("linear", optim, num_warmup_steps=int(cfg.warmup_ratio * steps),
                          num_training_steps=steps)
    rng = random.Random(cfg.seed)  # noqa: S311 - shuffling, not security
    losses: list[float] = []
    pending: list[float] = []  # losses of the micro-batches accumulated so far

    def step() -> None:
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optim.step()
        sched.step()
        optim.zero_grad(set_to_none=True)
        losses.append(sum(pending) / len(pending))
        pending.clear()
        on_step(len(losses), losses[-1])

    model.train()
    while len(losses) < steps:
        micro = 0
        for batch in batches(records, processor, images_dir, cfg.batch_size, cfg.max_length,
                             rng):
            loss = model(**_to(batch, device, model.dtype)).loss
            (loss / cfg.grad_accum).backward()
            pending.append(float(loss.detach()))
            micro += 1
            if micro % cfg.grad_accum == 0:
                step()
                if len(losses) >= steps:
                    return losses
        if micro == 0:
            raise FinetuneError("no record has an answer within --max-length tokens")
        if pending:  # the epoch's last, partial accumulation
            step()
    return losses


def save(model, processor, path: Path) -> Path:
    """Adapter weights (safetensors) + config + the processor: loadable on its own."""
    model.save_pretrained(path, safe_serialization=True)
    processor.save_pretrained(path)
    return path


def finetune(dataset_dir: str | Path, output_dir: str | Path, cfg: FinetuneConfig,
             cache_dir: str, device: str | None = None) -> dict:
    """Train, save ``adapter/`` (+ ``checkpoints/step-N/``, ``merged/`` with ``merge``)."""
    import torch
    from transformers import AutoProcessor

    cfg.check()
    dataset_dir, out = Path(dataset_dir), Path(output_dir)
    train_records, val_records = load_split(dataset_dir, "train"), load_split(dataset_dir, "val")
    if not train_records:
        raise FinetuneError(f"no training records in {dataset_dir} (run export-instructions)")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(cfg.seed)
    base = resolve_base(cfg.base, cache_dir)
    processor = AutoProcessor.from_pretrained(base)
    model = build_model(cfg, base, device)
    images = dataset_dir / IMAGES_DIR
    began = time.perf_counter()
    val_before = evaluate(model, val_records, processor, images, cfg, device)

    def on_step(step: int, loss: float) -> None:
        log.info("step %d loss %.4f", step, loss)
        if cfg.save_steps and step % cfg.save_steps == 0:
            save(model, processor, out / CHECKPOINTS_DIR / f"step-{step:06d}")

    losses = train(model, train_records, processor, images, cfg, device, on_step)
    val_after = evaluate(model, val_records, processor, images, cfg, device)
    adapter = save(model, processor, out / ADAPTER_DIR)
    summary = {"base": base, "device": device, "train_records": len(train_records),
               "val_records": len(val_records), "steps": len(losses), "losses": losses,
               "val_loss_before": val_before, "val_loss_after": val_after,
               "seconds": round(time.perf_counter() - began, 2), "adapter": str(adapter),
               "trainable_parameters": sum(p.numel() for p in model.parameters()
                                           if p.requires_grad),
               "config": asdict(cfg) | {"target_modules": list(cfg.target_modules)}}
    if cfg.merge:
        summary["merged"] = str(merge(model, processor, out / MERGED_DIR))
    atomic.write_bytes(out / SUMMARY, json.dumps(summary, indent=1).encode())
    return summary


def merge(model, processor, path: Path) -> Path:
    """Fold the adapter into the weights: a plain checkpoint for vLLM or ``from_pretrained``."""
    merged = model.merge_and_unload()
    merged.config.use_cache = True
    merged.save_pretrained(path, safe_serialization=True)
    processor.save_pretrained(path)
    return path
