"""LoRA (and 4-bit QLoRA) fine-tuning of a LLaVA checkpoint with ``transformers.Trainer``.

Why ``Trainer`` and not TRL's ``SFTTrainer``: what SFTTrainer adds is text-side dataset work
(chat templates, packing, completion-only masking of plain text).  LLaVA's inputs are images
plus a prompt whose ``<image>`` expands into hundreds of tokens, so the masking and the pixel
batches must come from our own collator (``tasks.adapt.collate``: labels on the gpt turns only)
either way; with it, SFTTrainer is a ``Trainer`` with its dataset preparation switched off,
and one more dependency.  ``Trainer`` brings what a long GPU run needs: checkpoints with
optimizer, scheduler, gradient-scaler and RNG state (``--resume``), accumulation, warm-up and
cosine schedules, fp16/bf16 mixed precision, periodic evaluation, and DDP under
``accelerate launch`` / ``torchrun`` with no change to this code.

Only the language model's attention and MLP projections get LoRA adapters by default; the
vision tower and the projector stay frozen unless asked (``unfreeze_vision_layers``,
``train_projector``: those modules are trained in full and saved with the adapter).  With
``load_in_4bit`` the language model's linear layers are loaded as NF4 (bitsandbytes, CUDA
only), the vision tower and projector stay unquantised, and gradient checkpointing is on.

Stages do not import flows: progress reporting (the Prefect UI) comes in as ``callbacks``.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import re
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from schemas.instructions import IMAGES_DIR
from tasks.adapt.collate import Collator, InstructionDataset
from tasks.adapt.export import load_split
from tasks.io import atomic

log = logging.getLogger(__name__)
LM_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTER_DIR, MERGED_DIR, CHECKPOINTS_DIR = "adapter", "merged", "checkpoints"
SUMMARY = "finetune.json"
RUN_CONFIG = "finetune-config.json"  # in CHECKPOINTS_DIR: what a resumed run must match
DEFAULT_STEPS = 3000  # the reference recipe's length when neither max_steps nor epochs is given
#: options a resumed run may change; any other difference refuses the resume
RESUMABLE_CHANGES = frozenset({"resume", "merge", "max_eval", "eval_steps", "save_steps",
                               "workers"})
PRECISIONS = ("auto", "fp32", "fp16", "bf16")
NO_CUDA_4BIT = ("--load-in-4bit needs a CUDA GPU (bitsandbytes 4-bit kernels) and none is "
                "visible here")


class FinetuneError(Exception):
    """A fatal problem with the dataset or the configuration."""


@dataclass
class FinetuneConfig:
    """Defaults are the reference recipe for LLaVA-1.5-7B: batch 4 x accumulation 8, lr 2e-4
    cosine with 100 warm-up steps, fp16 on CUDA, a checkpoint and an evaluation every 500
    steps, 3,000 steps (when neither ``max_steps`` nor ``epochs`` is given)."""

    base: str = "llava-hf/llava-1.5-7b-hf"
    rank: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: tuple[str, ...] = LM_MODULES
    unfreeze_vision_layers: int = 0
    train_projector: bool = False
    epochs: int | None = None  # passes over train.json
    max_steps: int | None = None  # optimizer steps; overrides epochs
    lr: float = 2e-4
    scheduler: str = "cosine"  # any transformers SchedulerType: cosine, linear, constant, ...
    batch_size: int = 4  # per device
    grad_accum: int = 8
    warmup_steps: int = 100
    warmup_ratio: float | None = None  # share of all steps; replaces warmup_steps when given
    weight_decay: float = 0.0
    max_length: int = 2048
    save_steps: int | None = 500  # None: no checkpoints (and nothing to resume)
    eval_steps: int | None = 500  # None: validation loss before and after only
    max_eval: int = 256
    precision: str = "auto"  # auto = fp16 mixed precision on CUDA, fp32 on CPU
    load_in_4bit: bool = False  # QLoRA: NF4 language model (CUDA + bitsandbytes)
    gradient_checkpointing: bool | None = None  # None: on with load_in_4bit, else off
    merge: bool = False
    seed: int = 0
    resume: bool | None = None  # None: resume when OUTPUT_DIR/checkpoints holds one
    workers: int = 0  # DataLoader worker processes (image decoding off the training process)

    def check(self) -> None:
        """Bad values fail before a model is loaded, with the option's name."""
        positive = ("rank", "alpha", "batch_size", "grad_accum", "max_length", "max_eval")
        bad = [k for k in positive if getattr(self, k) < 1]
        bad += [k for k in ("epochs", "max_steps", "save_steps", "eval_steps")
                if getattr(self, k) is not None and getattr(self, k) < 1]
        bad += [k for k in ("warmup_steps", "workers", "unfreeze_vision_layers")
                if getattr(self, k) < 0]
        bad += ["lr"] * (self.lr <= 0) + ["dropout"] * (not 0 <= self.dropout < 1)
        bad += ["warmup_ratio"] * (self.warmup_ratio is not None
                                   and not 0 <= self.warmup_ratio < 1)
        bad += ["weight_decay"] * (self.weight_decay < 0)
        bad += ["precision"] * (self.precision not in PRECISIONS)
        bad += ["scheduler"] * (not _known_scheduler(self.scheduler))
        bad += ["target_modules"] * (not self.target_modules)
        if bad:
            raise FinetuneError("invalid value for " + ", ".join(
                f"--{k.replace('_', '-')}" for k in bad))

    def as_dict(self) -> dict:
        return asdict(self) | {"target_modules": list(self.target_modules)}


def _known_scheduler(name: str) -> bool:
    from transformers import SchedulerType

    return name in {s.value for s in SchedulerType}


def resolve_base(base: str, cache_dir: str) -> str:
    """``tiny`` → the locally built random LLaVA, as for the query engine."""
    if base == "tiny":
        from tasks.models.tiny_llava import ensure_tiny_llava

        return str(ensure_tiny_llava(cache_dir))
    return base


def resolve_precision(cfg: FinetuneConfig, cuda: bool) -> str:
    """fp32 | fp16 | bf16: the frozen weights' dtype and the Trainer's mixed precision."""
    if cfg.precision == "auto":
        return "fp16" if cuda else "fp32"
    if cfg.precision == "fp16" and not cuda:
        raise FinetuneError("--precision fp16 needs a CUDA GPU (use fp32 or bf16 on CPU)")
    return cfg.precision


def require_4bit(cuda: bool) -> None:
    """QLoRA needs CUDA and bitsandbytes (``pip install 'mmrag[qlora]'``): one line if not."""
    if not cuda:
        raise FinetuneError(NO_CUDA_4BIT)
    if importlib.util.find_spec("bitsandbytes") is None:
        raise FinetuneError("--load-in-4bit needs bitsandbytes: pip install 'mmrag[qlora]'")


def _dtype(precision: str):
    import torch

    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]


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


def quantization_config(precision: str):
    """NF4 with double quantisation for the language model; vision tower, projector and
    ``lm_head`` stay in ``precision`` (they are small, and LoRA targets the LM only)."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=_dtype(precision),
        llm_int8_skip_modules=["vision_tower", "multi_modal_projector", "lm_head"])


def build_model(cfg: FinetuneConfig, base: str, precision: str = "fp32"):
    """The base model with LoRA adapters; everything else frozen; trainable weights in fp32.

    Not moved to a device: the Trainer (accelerate) places it, one copy per process under DDP.
    A 4-bit model is placed at load time on this process's GPU."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlavaForConditionalGeneration

    checkpointing = cfg.load_in_4bit if cfg.gradient_checkpointing is None \
        else cfg.gradient_checkpointing
    kwargs: dict = {"dtype": _dtype(precision)}
    if cfg.load_in_4bit:
        from accelerate import PartialState

        kwargs |= {"quantization_config": quantization_config(precision),
                   "device_map": {"": PartialState().local_process_index}}
    model = LlavaForConditionalGeneration.from_pretrained(base, **kwargs)
    model.config.use_cache = False
    if cfg.load_in_4bit:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False})
    elif checkpointing:
        model.activation_checkpointing_enable({"use_reentrant": False})
    save = vision_layer_names(model, cfg.unfreeze_vision_layers)
    save += ["multi_modal_projector"] if cfg.train_projector else []
    lora = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                      target_modules=lm_target_regex(tuple(cfg.target_modules)),
                      modules_to_save=save or None, bias="none")
    try:
        model = get_peft_model(model, lora)
    except ValueError as e:  # target modules that match nothing
        raise FinetuneError(f"LoRA targets: {e}") from e
    for p in model.parameters():  # fp16 mixed precision unscales fp32 gradients only
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    return model


def training_arguments(cfg: FinetuneConfig, checkpoints: Path, precision: str, use_cpu: bool,
                       evaluate: bool, fresh: bool = True):
    """The recipe as ``TrainingArguments``; one loss logged per optimizer step.

    The validation loss before training is the Trainer's ``eval_on_start`` (a fresh run only; a
    resumed run finds it in the checkpoint's log history), not a ``trainer.evaluate()`` call
    before ``train()``: that marks the model as prepared, and accelerate then never wraps it in
    DistributedDataParallel, so several processes would train unsynchronised copies."""
    from transformers import TrainingArguments

    steps = cfg.max_steps or (None if cfg.epochs else DEFAULT_STEPS)
    return TrainingArguments(
        output_dir=str(checkpoints),
        per_device_train_batch_size=cfg.batch_size, per_device_eval_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.lr, lr_scheduler_type=cfg.scheduler, weight_decay=cfg.weight_decay,
        warmup_steps=cfg.warmup_ratio if cfg.warmup_ratio is not None else cfg.warmup_steps,
        max_grad_norm=1.0,
        num_train_epochs=cfg.epochs or 1, max_steps=steps or -1,
        fp16=precision == "fp16", bf16=precision == "bf16", use_cpu=use_cpu,
        logging_strategy="steps", logging_steps=1,
        save_strategy="steps" if cfg.save_steps else "no", save_steps=cfg.save_steps or 500,
        eval_strategy="steps" if evaluate and cfg.eval_steps else "no",
        eval_steps=cfg.eval_steps, eval_on_start=evaluate and fresh,
        prediction_loss_only=True, label_names=["labels"],
        seed=cfg.seed, data_seed=cfg.seed,
        dataloader_num_workers=cfg.workers, remove_unused_columns=False,
        ddp_find_unused_parameters=False, report_to="none", disable_tqdm=True)


def last_checkpoint(folder: Path) -> Path | None:
    """The newest complete ``checkpoint-N`` (its ``trainer_state.json`` parses: the Trainer
    writes it last, so a run killed while saving leaves a folder without it, which is skipped)."""
    if not folder.is_dir():
        return None
    found = sorted((int(m[1]), p) for p in folder.iterdir()
                   if p.is_dir() and (m := re.fullmatch(r"checkpoint-(\d+)", p.name)))
    for step, path in reversed(found):
        try:
            json.loads((path / "trainer_state.json").read_text())
            return path
        except (OSError, ValueError):
            log.warning("skipping incomplete checkpoint %s (step %d)", path, step)
    return None


def resume_point(cfg: FinetuneConfig, checkpoints: Path) -> Path | None:
    """The checkpoint to resume from, or None for a fresh run; refuses mismatched runs."""
    last = last_checkpoint(checkpoints)
    if cfg.resume and last is None:
        raise FinetuneError(f"--resume: no complete checkpoint in {checkpoints}")
    if last is None:
        return None
    if cfg.resume is False:
        raise FinetuneError(f"{checkpoints} holds checkpoints of an earlier run ({last.name}): "
                            "resume it (the default) or choose another OUTPUT_DIR")
    saved_path = checkpoints / RUN_CONFIG
    saved = json.loads(saved_path.read_text()) if saved_path.is_file() else {}
    now = cfg.as_dict()
    changed = sorted(k for k in now.keys() - RESUMABLE_CHANGES
                     if k in saved and saved[k] != now[k])
    if changed:
        raise FinetuneError(f"cannot resume {last}: options changed since it was written: "
                            + ", ".join(f"--{k.replace('_', '-')}" for k in changed))
    return last


def finetune(dataset_dir: str | Path, output_dir: str | Path, cfg: FinetuneConfig,
             cache_dir: str, device: str | None = None, callbacks: Sequence = ()) -> dict:
    """Train; write ``adapter/``, ``checkpoints/checkpoint-N/``, ``finetune.json`` (+ ``merged/``).

    ``device="cpu"`` keeps a CUDA machine's GPUs out of it.  ``callbacks`` are extra
    ``TrainerCallback`` objects (the flow's progress reporting, tests' fault injection).
    Under ``torchrun`` / ``accelerate launch`` every process calls this; only the first writes
    the adapter, the summary and the merged model."""
    import torch
    from transformers import AutoProcessor, PrinterCallback, Trainer, set_seed

    began = time.perf_counter()
    cfg.check()
    dataset_dir, out = Path(dataset_dir), Path(output_dir)
    cuda = device != "cpu" and torch.cuda.is_available()
    if cfg.load_in_4bit:
        require_4bit(cuda)
    precision = resolve_precision(cfg, cuda)
    train_records, val_records = load_split(dataset_dir, "train"), load_split(dataset_dir, "val")
    if not train_records:
        raise FinetuneError(f"no training records in {dataset_dir} (run export-instructions)")
    checkpoints = out / CHECKPOINTS_DIR
    resume_from = resume_point(cfg, checkpoints)
    base = resolve_base(cfg.base, cache_dir)
    processor = AutoProcessor.from_pretrained(base)
    images = dataset_dir / IMAGES_DIR
    train_set = InstructionDataset(train_records, processor, images, cfg.max_length)
    if not len(train_set):
        raise FinetuneError("no record has an answer within --max-length tokens")
    val_set = InstructionDataset(val_records[: cfg.max_eval], processor, images, cfg.max_length)
    set_seed(cfg.seed)  # the LoRA initialisation; the Trainer seeds again for the data order
    model = build_model(cfg, base, precision)
    args = training_arguments(cfg, checkpoints, precision, not cuda, bool(len(val_set)),
                              fresh=resume_from is None)
    trainer = Trainer(model=model, args=args, train_dataset=train_set,
                      eval_dataset=val_set if len(val_set) else None,
                      data_collator=Collator(processor.tokenizer.pad_token_id),
                      processing_class=processor, callbacks=[_step_log(), *callbacks])
    trainer.remove_callback(PrinterCallback)
    main = trainer.is_world_process_zero()
    if main and resume_from is None:
        checkpoints.mkdir(parents=True, exist_ok=True)
        atomic.write_bytes(checkpoints / RUN_CONFIG, json.dumps(cfg.as_dict(), indent=1).encode())
    if resume_from is not None:
        log.info("resuming from %s", resume_from)
    trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    history = trainer.state.log_history
    step = trainer.state.global_step
    val_before = next((e["eval_loss"] for e in history
                       if "eval_loss" in e and e.get("step") == 0), None)
    val_after = next((e["eval_loss"] for e in reversed(history)
                      if "eval_loss" in e and e.get("step") == step), None)
    if val_after is None and len(val_set):
        val_after = trainer.evaluate()["eval_loss"]
    trainer.save_model(str(out / ADAPTER_DIR))  # the first process writes, the others wait
    summary = {"base": base, "device": str(args.device), "world_size": args.world_size,
               "precision": precision, "load_in_4bit": cfg.load_in_4bit,
               "train_records": len(train_records), "val_records": len(val_records),
               "eval_records": len(val_set),
               "dropped_records": train_set.dropped, "steps": step,
               "losses": [e["loss"] for e in history if "loss" in e],
               "val_loss_before": val_before, "val_loss_after": val_after,
               "resumed_from": str(resume_from) if resume_from else None,
               "adapter": str(out / ADAPTER_DIR),
               "trainable_parameters": sum(p.numel() for p in model.parameters()
                                           if p.requires_grad),
               "main_process": main, "config": cfg.as_dict()}
    if main and cfg.merge:
        summary["merged"] = str(merge(out / ADAPTER_DIR, base, out / MERGED_DIR, precision))
    summary["seconds"] = round(time.perf_counter() - began, 2)
    if main:
        atomic.write_bytes(out / SUMMARY, json.dumps(summary, indent=1).encode())
    return summary


def merge(adapter: Path, base: str, path: Path, precision: str = "fp32") -> Path:
    """Fold the adapter into a fresh copy of the base weights (on the CPU, in ``precision``): a
    plain checkpoint for vLLM or ``from_pretrained``.  Reloading rather than merging the trained
    model in place also works for 4-bit runs, whose quantised weights cannot take the merge."""
    from peft import PeftModel
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(base, dtype=_dtype(precision))
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    merged.config.use_cache = True
    merged.save_pretrained(path, safe_serialization=True)
    AutoProcessor.from_pretrained(adapter).save_pretrained(path)
    return path


def _step_log():
    """One log line per optimizer step and per evaluation (the Trainer's printer is removed)."""
    from transformers import TrainerCallback

    class StepLog(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if not state.is_world_process_zero or not logs:
                return
            if "loss" in logs:
                log.info("step %d loss %.4f lr %.3g", state.global_step, logs["loss"],
                         logs.get("learning_rate", 0.0))
            if "eval_loss" in logs:
                log.info("step %d validation loss %.4f", state.global_step, logs["eval_loss"])

    return StepLog()
