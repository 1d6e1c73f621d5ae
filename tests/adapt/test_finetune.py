"""LoRA fine-tuning (transformers Trainer) on the tiny random LLaVA (CPU): learning, saving,
reloading, merging, use; options, refusals, progress reporting.  Kill-and-resume, several
processes and Ray Train: ``test_finetune_resume.py``."""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from finetune_fixtures import ANSWERS, QUESTION, write_dataset
from PIL import Image
from transformers import TrainerCallback

from tasks.adapt.collate import (
    IGNORE,
    InstructionDataset,
    collate,
    encode,
    image_token_count,
    prompt_length,
)
from tasks.adapt.export import load_split
from tasks.adapt.finetune import (
    LM_MODULES,
    NO_CUDA_4BIT,
    FinetuneConfig,
    FinetuneError,
    build_model,
    finetune,
    last_checkpoint,
    quantization_config,
    require_4bit,
    resolve_base,
)
from tasks.models.tiny_llava import IMAGE_SIZE, PATCH_SIZE


@pytest.fixture(scope="module")
def base(cache_dir) -> str:
    return resolve_base("tiny", str(cache_dir))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("ds"))


class Capture(TrainerCallback):
    """Keeps the trained model and the step numbers."""

    def __init__(self):
        self.model, self.steps = None, []

    def on_step_end(self, args, state, control, **kwargs):
        self.steps.append(state.global_step)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.model = model


@pytest.fixture(scope="module")
def trained(base, dataset, tmp_path_factory, cache_dir):
    """20 Trainer steps on the four records; logits of record 0 after, adapter, merge."""
    from transformers import AutoProcessor

    cfg = FinetuneConfig(base=base, rank=16, alpha=32, dropout=0.0, lr=2e-2, batch_size=2,
                         grad_accum=1, max_steps=20, warmup_steps=0, scheduler="linear",
                         unfreeze_vision_layers=1, save_steps=None, eval_steps=10, merge=True)
    out = tmp_path_factory.mktemp("ft")
    capture = Capture()
    summary = finetune(dataset, out, cfg, str(cache_dir), callbacks=[capture])
    processor = AutoProcessor.from_pretrained(base)
    records = load_split(dataset, "train")
    batch = collate([encode(records[0], processor, dataset / "images", 512)],
                    processor.tokenizer.pad_token_id)
    return {"summary": summary, "losses": summary["losses"], "batch": batch,
            "logits": _logits(capture.model, batch), "adapter": Path(summary["adapter"]),
            "merged": Path(summary["merged"]), "records": records, "processor": processor,
            "steps": capture.steps, "out": out}


def _logits(model, batch):
    model.eval()
    with torch.no_grad():
        return model(**batch).logits


def test_loss_falls_on_a_tiny_overfit_set(trained):
    losses, summary = trained["losses"], trained["summary"]
    assert len(losses) == 20 and all(torch.isfinite(torch.tensor(losses)))
    assert trained["steps"] == list(range(1, 21))
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < first - 0.15, (first, last)
    # validation = the first train record: the Trainer's eval loss falls too
    assert summary["val_loss_after"] < summary["val_loss_before"] - 0.1
    assert summary["device"] == "cpu" and summary["precision"] == "fp32"
    assert summary["world_size"] == 1 and summary["resumed_from"] is None
    assert json.loads((trained["out"] / "finetune.json").read_text())["losses"] == losses
    assert not list((trained["out"] / "checkpoints").glob("checkpoint-*"))  # save_steps=None


def test_labels_cover_only_the_gpt_turns(trained, dataset):
    processor, record = trained["processor"], trained["records"][1]
    enc = encode(record, processor, dataset / "images", 512)
    ids, labels = enc["input_ids"], enc["labels"]
    assert len(ids) == len(labels)
    assert ids.count(processor.image_token_id) == (IMAGE_SIZE // PATCH_SIZE) ** 2
    trained_ids = [t for t in labels if t != IGNORE]
    eos = processor.tokenizer.eos_token_id
    assert trained_ids.count(eos) == 2  # one per gpt turn
    text = processor.tokenizer.decode(trained_ids, skip_special_tokens=False)
    assert text == f" {ANSWERS[1]}</s> This photo was taken in City1.</s>"
    assert all(labels[i] == IGNORE for i, t in enumerate(ids) if t == processor.image_token_id)
    assert encode(record, processor, dataset / "images", 10)["input_ids"] == ids[:10]


def test_lora_targets_the_language_model_only(base):
    model = build_model(FinetuneConfig(base=base), base)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n and ".language_model." in n for n in names)
    assert {re.search(r"\.(\w+_proj)\.lora_", n)[1] for n in names} == set(LM_MODULES)
    assert len(names) == 2 * len(LM_MODULES) * 2  # 2 layers x 7 projections x (A, B)
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)

    cfg = FinetuneConfig(base=base, unfreeze_vision_layers=1, train_projector=True)
    names = [n for n, p in build_model(cfg, base).named_parameters() if p.requires_grad]
    vision = {n for n in names if "vision_tower" in n}
    # the tiny tower has 2 layers and LLaVA reads layer -2: layer 0 is the last one used
    assert vision and all(".layers.0." in n for n in vision)
    assert any("multi_modal_projector" in n for n in names)
    with pytest.raises(FinetuneError, match="unfreeze-vision-layers 2"):
        build_model(FinetuneConfig(base=base, unfreeze_vision_layers=2), base)
    with pytest.raises(FinetuneError, match="LoRA targets"):
        build_model(FinetuneConfig(base=base, target_modules=("nope",)), base)


def test_the_text_alone_predicts_which_records_have_an_answer(trained, dataset):
    """InstructionDataset drops records up front from token counts alone (no image read):
    exactly those whose encoding keeps no label within max_length."""
    processor, records = trained["processor"], trained["records"]
    n_image = image_token_count(processor)
    assert n_image == (IMAGE_SIZE // PATCH_SIZE) ** 2
    prompt = prompt_length(records[0], processor, n_image)  # the same question in all four
    first_label = encode(records[0], processor, dataset / "images", 10_000)["labels"].index(
        next(t for t in encode(records[0], processor, dataset / "images", 10_000)["labels"]
             if t != IGNORE))
    assert prompt == first_label  # the answer starts right after the predicted prompt
    for max_length in (10, prompt - 1, prompt, prompt + 1, 512):
        kept = InstructionDataset(records, processor, dataset / "images", max_length)
        expect = [r for r in records if any(
            t != IGNORE for t in encode(r, processor, dataset / "images", max_length)["labels"])]
        assert [r.id for r in kept.records] == [r.id for r in expect], max_length
        assert kept.dropped == len(records) - len(expect)
        assert len(kept) == (4 if max_length > prompt else 0), max_length
    item = InstructionDataset(records, processor, dataset / "images", 512)[1]
    assert item["input_ids"] == encode(records[1], processor, dataset / "images",
                                       512)["input_ids"]


def test_gradient_checkpointing_still_trains_the_adapter(trained, base):
    model = build_model(FinetuneConfig(base=base, gradient_checkpointing=True), base)
    assert model.base_model.model.is_activation_checkpointing
    model.train()
    model(**trained["batch"]).loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_adapter_reloads_with_the_same_logits(trained, base):
    from peft import PeftModel
    from transformers import LlavaForConditionalGeneration

    files = {p.name for p in trained["adapter"].iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= files
    fresh = LlavaForConditionalGeneration.from_pretrained(base)
    base_logits = _logits(fresh, trained["batch"])
    reloaded = PeftModel.from_pretrained(fresh, trained["adapter"])
    assert torch.allclose(_logits(reloaded, trained["batch"]), trained["logits"], atol=1e-6)
    assert (base_logits - trained["logits"]).abs().max() > 1e-2  # the adapter changes them


def test_merged_checkpoint_loads_plainly_with_the_same_logits(trained):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    assert not (trained["merged"] / "adapter_config.json").exists()
    merged = LlavaForConditionalGeneration.from_pretrained(trained["merged"])
    AutoProcessor.from_pretrained(trained["merged"])
    assert not any("lora" in n for n, _ in merged.named_parameters())
    assert torch.allclose(_logits(merged, trained["batch"]), trained["logits"], atol=1e-5)


def test_transformers_engine_generates_with_the_adapter(trained, base, dataset, monkeypatch):
    from mmrag.settings import Settings
    from tasks.models.engines import ADAPTER_ENGINE, EngineConfig, GenRequest, make_engine

    with Image.open(dataset / "images" / "c" / "red.png") as im:
        request = GenRequest(QUESTION, im.convert("RGB"))
    plain = make_engine(EngineConfig("transformers", base, max_new_tokens=8)).generate([request])[0]
    tuned_engine = make_engine(EngineConfig("transformers", base, max_new_tokens=8,
                               adapter=str(trained["adapter"])))
    tuned = tuned_engine.generate([request])[0]
    assert plain.error is None and tuned.error is None
    assert tuned.text != plain.text
    # the engine's model is exactly base + the trained adapter (merged at load)
    assert torch.allclose(_logits(tuned_engine.model, trained["batch"]), trained["logits"],
                          atol=1e-5)
    with pytest.raises(ValueError, match="merge it"):
        make_engine(EngineConfig("vllm", base, adapter=str(trained["adapter"])))
    monkeypatch.setenv("MMRAG_VLM_ADAPTER", str(trained["adapter"]))
    assert Settings().vlm_adapter == str(trained["adapter"])
    assert "transformers engine only" in ADAPTER_ENGINE


def test_cli_finetune_writes_adapter_checkpoints_and_merged(dataset, tmp_path, cache_dir,
                                                            monkeypatch):
    from typer.testing import CliRunner

    from mmrag.cli import app

    monkeypatch.setenv("MMRAG_CACHE_DIR", str(cache_dir))
    out = tmp_path / "run"
    cli = ["--profile", "tiny", "finetune", str(dataset)]
    args = [*cli, str(out), "--max-steps", "2", "--batch-size", "2", "--grad-accum", "2",
            "--save-steps", "1", "--eval-steps", "1", "--warmup-steps", "1", "--merge"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "2 steps on 4 records" in result.output and "validation loss" in result.output
    assert "(cpu, fp32)" in result.output and "resumed" not in result.output
    summary = json.loads((out / "finetune.json").read_text())
    assert len(summary["losses"]) == 2 and summary["config"]["grad_accum"] == 2
    assert summary["config"]["scheduler"] == "cosine" and summary["config"]["warmup_steps"] == 1
    for step in ("checkpoint-1", "checkpoint-2"):  # Trainer checkpoints: resumable
        files = {p.name for p in (out / "checkpoints" / step).iterdir()}
        assert {"adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth",
                "trainer_state.json", "tokenizer.json"} <= files, files
    assert last_checkpoint(out / "checkpoints") == out / "checkpoints" / "checkpoint-2"
    evals = [e for e in json.loads((out / "checkpoints" / "checkpoint-2" / "trainer_state.json")
                                   .read_text())["log_history"] if "eval_loss" in e]
    assert [e["step"] for e in evals] == [0, 1, 2]  # before, then every --eval-steps
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert (out / "merged" / "model.safetensors").is_file()

    again = CliRunner().invoke(app, args)  # a finished run: resumed at its last step, no steps
    assert again.exit_code == 0, again.output
    assert "resumed from" in again.output and "checkpoint-2" in again.output
    assert json.loads((out / "finetune.json").read_text())["losses"] == summary["losses"]

    def refused(*extra, dataset_dir=dataset, run=out) -> str:
        res = CliRunner().invoke(app, ["--profile", "tiny", "finetune", str(dataset_dir),
                                       str(run), *extra])
        assert res.exit_code == 2, res.output
        assert len(res.output.strip().splitlines()) == 1, res.output  # one line, no traceback
        return res.output

    assert "--lr" in (msg := refused("--lr", "0", "--target-modules", "")) \
        and "--target-modules" in msg
    assert "no training records" in refused(dataset_dir=tmp_path)
    assert "--rank" in refused("--max-steps", "2", "--rank", "4")  # a resume must match
    assert "resume it" in refused("--max-steps", "2", "--no-resume")
    assert "no complete checkpoint" in refused("--resume", run=tmp_path / "fresh")
    assert "--scheduler" in refused("--scheduler", "sideways", run=tmp_path / "fresh")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert NO_CUDA_4BIT in refused("--load-in-4bit", run=tmp_path / "fresh")
    assert "fp16 needs a CUDA GPU" in refused("--precision", "fp16", run=tmp_path / "fresh")
    assert not (tmp_path / "fresh").exists()  # refused before anything was written


def test_4bit_path_refuses_without_cuda_or_bitsandbytes(monkeypatch):
    """QLoRA itself needs a GPU; what runs here: the refusals and the quantisation recipe."""
    import importlib.util

    with pytest.raises(FinetuneError) as e:
        require_4bit(cuda=False)
    assert str(e.value) == NO_CUDA_4BIT and "\n" not in NO_CUDA_4BIT
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    with pytest.raises(FinetuneError, match=r"mmrag\[qlora\]"):
        require_4bit(cuda=True)
    q = quantization_config("fp16")
    assert q.load_in_4bit and q.bnb_4bit_quant_type == "nf4" and q.bnb_4bit_use_double_quant
    assert q.bnb_4bit_compute_dtype == torch.float16
    assert {"vision_tower", "multi_modal_projector", "lm_head"} <= set(q.llm_int8_skip_modules)


def test_last_checkpoint_skips_one_torn_by_a_kill(tmp_path):
    """The Trainer writes trainer_state.json last: a folder without it (or with half of it)
    is a checkpoint the kill interrupted."""
    for step, state in ((2, "{}"), (4, '{"log_history": []}'), (6, '{"log_hi'), (8, None)):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        if state is not None:
            (folder / "trainer_state.json").write_text(state)
    (tmp_path / "checkpoint-x").mkdir()
    assert last_checkpoint(tmp_path) == tmp_path / "checkpoint-4"
    assert last_checkpoint(tmp_path / "missing") is None


def test_progress_callback_counts_steps_from_the_checkpoint(monkeypatch):
    """The flow's TrainerCallback feeds flows.progress (bar, log lines, Prefect artifact)."""
    from contextlib import contextmanager

    import flows.finetune as ff

    calls: list = []

    @contextmanager
    def fake_progress(total, label, logger):
        calls.append(("open", total, label))
        yield lambda n: calls.append(("advance", n))
        calls.append(("close",))

    monkeypatch.setattr(ff, "progress", fake_progress)
    with ff.TrainingProgress() as tracker:
        cb = tracker.callback()
        state = SimpleNamespace(is_world_process_zero=True, max_steps=10, global_step=4)
        cb.on_train_begin(None, state, None)
        for _ in range(6):
            cb.on_step_end(None, state, None)
    assert calls == [("open", 10, "finetune"), ("advance", 4)] + [("advance", 1)] * 6 \
        + [("close",)]
    calls.clear()
    with ff.TrainingProgress() as tracker:  # other ranks of a multi-GPU run stay silent
        cb = tracker.callback()
        cb.on_train_begin(None, SimpleNamespace(is_world_process_zero=False, max_steps=10,
                                                global_step=0), None)
        cb.on_step_end(None, None, None)
    assert calls == []


def test_flow_exports_from_the_table_then_trains(tmp_path, settings, monkeypatch):
    from instruction_fixtures import make_rows, write_table

    import flows.finetune as ff
    from flows.finetune import finetune_flow

    totals: list[int] = []
    real = ff.progress

    def spy(total, label, logger):
        totals.append(total)
        return real(total, label, logger)

    monkeypatch.setattr(ff, "progress", spy)

    write_table(settings.db, make_rows(tmp_path / "dump", 0, 6))
    settings = settings.model_copy(update={"table_suffix": ""})
    result = finetune_flow.fn(str(tmp_path / "ds"), str(tmp_path / "ft"),
                              {"max_steps": 1, "batch_size": 2, "grad_accum": 1},
                              settings, export_options={"val_fraction": 0.0})
    assert result["export"]["records"] == {"train": 6, "val": 0}
    assert result["finetune"]["steps"] == 1 and result["finetune"]["train_records"] == 6
    assert Path(result["finetune"]["adapter"], "adapter_model.safetensors").is_file()
    assert totals == [1]  # the Trainer's progress reached flows.progress
    write_table(settings.db, make_rows(tmp_path / "dump", 6, 2))  # the table grows
    again = finetune_flow.fn(str(tmp_path / "ds"), str(tmp_path / "ft"),
                             {"max_steps": 1, "batch_size": 2, "grad_accum": 1}, settings)
    assert "export" not in again  # resumed from checkpoint-1 on the dataset as exported
    assert again["finetune"]["resumed_from"].endswith("checkpoint-1")
    assert again["finetune"]["train_records"] == 6
    with pytest.raises(ValueError, match="unknown finetune options"):
        finetune_flow.fn(str(tmp_path / "ds"), str(tmp_path / "x"), {"epoch": 1}, settings,
                         export=False)


def test_epochs_step_on_partial_accumulation_and_empty_labels_fail(base, dataset, tmp_path,
                                                                  cache_dir):
    capture = Capture()
    cfg = FinetuneConfig(base=base, epochs=2, batch_size=1, grad_accum=3, warmup_steps=0,
                         save_steps=None, eval_steps=None)
    summary = finetune(dataset, tmp_path / "e", cfg, str(cache_dir), callbacks=[capture])
    # 4 batches / 3 per step -> 2 steps per epoch, the second on the epoch's last batch alone
    assert capture.steps == [1, 2, 3, 4] and len(summary["losses"]) == 4
    short = FinetuneConfig(base=base, max_length=10, max_steps=1)  # the image alone is longer
    with pytest.raises(FinetuneError, match="max-length"):
        finetune(dataset, tmp_path / "s", short, str(cache_dir))


def test_memory_figures_come_from_the_parameter_counts(base):
    """tasks/adapt/memory.py counts what build_model trains, and the guide's 7B table is its
    output (computed, not measured)."""
    from transformers import AutoConfig, LlavaForConditionalGeneration

    from tasks.adapt.memory import (
        activations_estimate,
        count_parameters,
        estimate,
        llava_15_7b_config,
    )

    counts = count_parameters(AutoConfig.from_pretrained(base), rank=8)
    real = LlavaForConditionalGeneration.from_pretrained(base)
    assert counts.total == sum(p.numel() for p in real.parameters())
    model = build_model(FinetuneConfig(base=base, rank=8), base)
    assert counts.lora == sum(p.numel() for p in model.parameters() if p.requires_grad)

    config = llava_15_7b_config()
    c7 = count_parameters(config)
    assert (c7.total, c7.lm_linear, c7.lora) == (7_063_427_072, 6_476_005_376, 19_988_480)
    page = (Path(__file__).resolve().parents[2] / "docs" / "guide" / "adapt.md").read_text()
    figures = [estimate(c7, False)["frozen_weights_gib"], estimate(c7, True)["frozen_weights_gib"],
               estimate(c7, False)["lora_and_optimizer_gib"]]
    figures += [activations_estimate(config, 4, s, ck)["total_gib"]
                for s in (1024, 2048) for ck in (False, True)]
    for figure in figures:
        assert f"{figure:.2f} GiB" in page, figure
