"""``mmrag export-instructions`` and ``mmrag finetune``: domain adaptation of the answer model.

Both are single-machine jobs that run as plain functions, without Prefect: an export reads one
table and writes one folder, a fine-tune holds the GPUs of one machine for hours (several GPUs:
the same command under ``torchrun`` / ``accelerate launch``); an ephemeral Prefect server would
add start-up time and nothing else.  ``flows/finetune.py`` wraps both for deployments.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mmrag.cli.app import app, fatal, settings_from


@app.command("export-instructions")
def export_instructions(
    ctx: typer.Context,
    out_dir: Annotated[Path, typer.Argument(help="dataset folder to write")],
    val_fraction: Annotated[float, typer.Option(help="share of images for validation")]
    = 0.1,
    seed: Annotated[int, typer.Option(help="salt of the split hash")] = 0,
    answers: Annotated[list[str] | None, typer.Option(
        "--answers", help="query run_id whose answers to add (repeatable)")] = None,
    reviewed: Annotated[Path | None, typer.Option(
        help="CSV/JSONL/Parquet of accepted (run_id, query_id[, answer]) rows")] = None,
    link: Annotated[bool, typer.Option(
        "--link/--copy", help="hardlink images (copy across filesystems) or copy")] = True,
    limit: Annotated[int | None, typer.Option(help="at most N images (by image_id)")]
    = None,
    table: Annotated[str | None, typer.Option(help="images table (default: the model's)")]
    = None,
    answers_root: Annotated[str | None, typer.Option(
        help="answers dataset root [MMRAG_OUT]")] = None,
) -> None:
    """Write a LLaVA instruction dataset (train.json, val.json, images/) from the tables."""
    settings = settings_from(ctx)
    manifest = _export(settings, out_dir, dict(
        val_fraction=val_fraction, seed=seed, mode="link" if link else "copy",
        limit=limit, max_pixels=settings.max_image_pixels), answers, reviewed,
        table, answers_root)
    skipped = ", ".join(f"{k}={v}" for k, v in manifest["skipped"].items()) or "none"
    typer.echo(f"wrote {manifest['records']['train']} train / {manifest['records']['val']} "
               f"val records ({manifest['images']['train']} / {manifest['images']['val']} "
               f"images) to {out_dir}\n  from {manifest['table']} version "
               f"{manifest['table_version']}; skipped: {skipped}")

@app.command("finetune")
def finetune(
    ctx: typer.Context,
    dataset_dir: Annotated[Path, typer.Argument(help="folder from export-instructions")],
    output_dir: Annotated[Path, typer.Argument(help="adapter, checkpoints, merged model")],
    base: Annotated[str | None, typer.Option(
        help="LLaVA model id or folder; tiny = the random test model [MMRAG_VLM_MODEL]")]
    = None,
    rank: Annotated[int, typer.Option(help="LoRA rank")] = 8,
    alpha: Annotated[int, typer.Option(help="LoRA alpha (scale = alpha / rank)")] = 16,
    dropout: Annotated[float, typer.Option(help="LoRA dropout")] = 0.05,
    target_modules: Annotated[str, typer.Option(
        help="comma-separated language-model projections")]
    = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
    unfreeze_vision_layers: Annotated[int, typer.Option(
        help="train the last N vision layers LLaVA reads, in full")] = 0,
    train_projector: Annotated[bool, typer.Option(help="train the projector in full")]
    = False,
    epochs: Annotated[int | None, typer.Option(
        help="passes over train.json (neither this nor --max-steps: 3000 steps)")] = None,
    max_steps: Annotated[int | None, typer.Option(
        help="optimizer steps (beats epochs)")] = None,
    lr: Annotated[float, typer.Option(help="peak learning rate")] = 2e-4,
    scheduler: Annotated[str, typer.Option(help="cosine | linear | constant | ...")]
    = "cosine",
    batch_size: Annotated[int, typer.Option(help="records per forward pass, per GPU")] = 4,
    grad_accum: Annotated[int, typer.Option(help="forward passes per optimizer step")] = 8,
    warmup_steps: Annotated[int, typer.Option(help="steps warming up")] = 100,
    warmup_ratio: Annotated[float | None, typer.Option(
        help="share of steps warming up (replaces --warmup-steps)")] = None,
    max_length: Annotated[int, typer.Option(help="tokens per record (image incl.)")] = 2048,
    save_steps: Annotated[int | None, typer.Option(
        help="checkpoint every N steps (0: never)")] = 500,
    eval_steps: Annotated[int | None, typer.Option(
        help="validation loss every N steps (0: before and after only)")] = 500,
    precision: Annotated[str, typer.Option(
        help="auto (fp16 on CUDA, else fp32) | fp32 | fp16 | bf16")] = "auto",
    load_in_4bit: Annotated[bool, typer.Option(
        "--load-in-4bit", help="QLoRA: NF4 base, CUDA only (the qlora extra: bitsandbytes)")]
    = False,
    gradient_checkpointing: Annotated[bool | None, typer.Option(
        "--gradient-checkpointing/--no-gradient-checkpointing",
        help="less memory, slower (default: on with --load-in-4bit)")] = None,
    resume: Annotated[bool | None, typer.Option(
        "--resume/--no-resume",
        help="continue from OUTPUT_DIR/checkpoints (default: when it holds one)")] = None,
    workers: Annotated[int, typer.Option(help="DataLoader processes reading images")] = 0,
    merge: Annotated[bool, typer.Option(help="also write merged/ (for vLLM)")] = False,
    seed: Annotated[int, typer.Option(help="data order, LoRA init and dropout")] = 0,
) -> None:
    """LoRA fine-tune LLaVA on an exported dataset (transformers Trainer); writes
    OUTPUT_DIR/adapter (+ merged). Several GPUs: start it with torchrun or accelerate launch."""
    settings = settings_from(ctx)
    from tasks.adapt.finetune import FinetuneConfig

    given = dict(locals())  # the options named like FinetuneConfig fields
    given |= {k: given[k] or None for k in ("save_steps", "eval_steps")}  # 0 = never
    cfg = FinetuneConfig(
        base=base or settings.vlm_spec()[1],
        target_modules=tuple(t.strip() for t in target_modules.split(",") if t.strip()),
        **{k: given[k] for k in FinetuneConfig.__dataclass_fields__
           if k in given and k not in ("base", "target_modules")})
    summary = _finetune(settings, dataset_dir, output_dir, cfg)
    if summary["main_process"]:
        _print_finetune(summary)


def _export(settings, out_dir: Path, options: dict, answers, reviewed, table,
            answers_root) -> dict:
    from flows import config
    from tasks.adapt.answer_records import select_answers
    from tasks.adapt.export import export_instructions
    from tasks.adapt.options import ExportOptions, InstructionError
    from tasks.io.images import Rejected
    from tasks.io.store import StoreError

    storage = config.storage(settings)
    try:
        if reviewed is not None and not answers:
            raise InstructionError("--reviewed needs --answers RUN_ID")
        frame = select_answers(answers_root or settings.out, answers, reviewed, storage) \
            if answers else None
        return export_instructions(settings.db, table or config.images_table(settings), out_dir,
                                   ExportOptions(**options), frame, storage)
    except (InstructionError, StoreError, Rejected, ValueError, OSError) as e:
        fatal(str(e))


def _finetune(settings, dataset_dir: Path, output_dir: Path, cfg) -> dict:
    from pydantic import ValidationError

    from flows.finetune import TrainingProgress
    from tasks.adapt.finetune import FinetuneError, finetune

    try:
        with TrainingProgress() as progress:
            return finetune(dataset_dir, output_dir, cfg, settings.cache_dir,
                            callbacks=[progress.callback()])
    except (FinetuneError, ValidationError, OSError) as e:
        fatal(str(e).splitlines()[0])


def _print_finetune(summary: dict) -> None:
    losses = summary["losses"]
    devices = f"{summary['device']} x{summary['world_size']}" if summary["world_size"] > 1 \
        else summary["device"]
    lines = [f"{summary['steps']} steps on {summary['train_records']} records in "
             f"{summary['seconds']} s ({devices}, {summary['precision']}"
             f"{', 4-bit base' if summary['load_in_4bit'] else ''}): loss {losses[0]:.4f} -> "
             f"{losses[-1]:.4f}"]
    if summary["resumed_from"]:
        lines.append(f"  resumed from {summary['resumed_from']}")
    if summary["val_loss_before"] is not None:
        lines.append(f"  validation loss {summary['val_loss_before']:.4f} -> "
                     f"{summary['val_loss_after']:.4f} ({summary['eval_records']} records)")
    lines.append(f"  adapter: {summary['adapter']} (MMRAG_VLM_ADAPTER)")
    if summary.get("merged"):
        lines.append(f"  merged: {summary['merged']} (MMRAG_VLM_MODEL, vLLM)")
    typer.echo("\n".join(lines))
