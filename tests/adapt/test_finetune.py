"""LoRA fine-tuning on the tiny random LLaVA (CPU): learning, saving, reloading, merging, use."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from PIL import Image

from tasks.adapt.collate import IGNORE, collate, encode
from tasks.adapt.export import load_split
from tasks.adapt.finetune import (
    LM_MODULES,
    FinetuneConfig,
    FinetuneError,
    build_model,
    merge,
    resolve_base,
    save,
    total_steps,
    train,
)
from tasks.models.tiny_llava import IMAGE_SIZE, PATCH_SIZE

ANSWERS = ["The street is busy with cars.", "A green tree grows next to a red car.",
           "The city at night is bright.", "Two dogs play in the park."]
QUESTION = "Describe this street scene."


def _write_dataset(root: Path) -> Path:
    """Four coloured images, two-turn conversations; val = one train record (overfit check)."""
    (root / "images" / "c").mkdir(parents=True)
    records = []
    for i, (colour, answer) in enumerate(zip(["red", "green", "blue", "yellow"], ANSWERS)):
        Image.new("RGB", (40, 30), colour).save(root / "images" / "c" / f"{colour}.png")
        records.append({"id": f"r{i}", "image": f"c/{colour}.png", "conversations": [
            {"from": "human", "value": f"<image>\n{QUESTION}"}, {"from": "gpt", "value": answer},
            {"from": "human", "value": "Which city is this?"},
            {"from": "gpt", "value": f"This photo was taken in City{i}."}]})
    (root / "train.json").write_text(json.dumps(records))
    (root / "val.json").write_text(json.dumps(records[:1]))
    return root


@pytest.fixture(scope="module")
def base(cache_dir) -> str:
    return resolve_base("tiny", str(cache_dir))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return _write_dataset(tmp_path_factory.mktemp("ds"))


@pytest.fixture(scope="module")
def trained(base, dataset, tmp_path_factory):
    """20 steps on the four records; logits of record 0 before and after, adapter, merge."""
    from transformers import AutoProcessor

    torch.manual_seed(0)
    cfg = FinetuneConfig(base=base, rank=16, alpha=32, dropout=0.0, lr=2e-2, batch_size=2,
                         grad_accum=1, max_steps=20, warmup_ratio=0.0, unfreeze_vision_layers=1)
    processor = AutoProcessor.from_pretrained(base)
    records = load_split(dataset, "train")
    model = build_model(cfg, base, "cpu")
    batch = collate([encode(records[0], processor, dataset / "images", 512)],
                    processor.tokenizer.pad_token_id)
    losses = train(model, records, processor, dataset / "images", cfg, "cpu", lambda *_: None)
    model.eval()
    with torch.no_grad():
        logits = model(**batch).logits
    out = tmp_path_factory.mktemp("ft")
    adapter = save(model, processor, out / "adapter")
    merged = merge(model, processor, out / "merged")
    return {"losses": losses, "batch": batch, "logits": logits, "adapter": adapter,
            "merged": merged, "records": records, "processor": processor}


def _logits(model, batch):
    model.eval()
    with torch.no_grad():
        return model(**batch).logits


def test_loss_falls_on_a_tiny_overfit_set(trained):
    losses = trained["losses"]
    assert len(losses) == 20 and all(torch.isfinite(torch.tensor(losses)))
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < first - 0.15, (first, last)


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
    model = build_model(FinetuneConfig(base=base), base, "cpu")
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n and ".language_model." in n for n in names)
    assert {re.search(r"\.(\w+_proj)\.lora_", n)[1] for n in names} == set(LM_MODULES)
    assert len(names) == 2 * len(LM_MODULES) * 2  # 2 layers x 7 projections x (A, B)

    cfg = FinetuneConfig(base=base, unfreeze_vision_layers=1, train_projector=True)
    names = [n for n, p in build_model(cfg, base, "cpu").named_parameters() if p.requires_grad]
    vision = {n for n in names if "vision_tower" in n}
    # the tiny tower has 2 layers and LLaVA reads layer -2: layer 0 is the last one used
    assert vision and all(".layers.0." in n for n in vision)
    assert any("multi_modal_projector" in n for n in names)
    with pytest.raises(FinetuneError, match="unfreeze-vision-layers 2"):
        build_model(FinetuneConfig(base=base, unfreeze_vision_layers=2), base, "cpu")
    with pytest.raises(FinetuneError, match="LoRA targets"):
        build_model(FinetuneConfig(base=base, target_modules=("nope",)), base, "cpu")


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
    args = ["--profile", "tiny", "finetune", str(dataset), str(out), "--max-steps", "2",
            "--batch-size", "2", "--grad-accum", "2", "--save-steps", "1", "--merge"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "2 steps on 4 records" in result.output and "validation loss" in result.output
    summary = json.loads((out / "finetune.json").read_text())
    assert len(summary["losses"]) == 2 and summary["config"]["grad_accum"] == 2
    for step in ("step-000001", "step-000002"):
        assert (out / "checkpoints" / step / "adapter_model.safetensors").is_file()
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert (out / "merged" / "model.safetensors").is_file()
    bad = CliRunner().invoke(app, ["--profile", "tiny", "finetune", str(dataset), str(out),
                                   "--lr", "0", "--target-modules", ""])
    assert bad.exit_code == 2 and "--lr" in bad.output and "--target-modules" in bad.output
    empty = CliRunner().invoke(app, ["--profile", "tiny", "finetune", str(tmp_path), str(out)])
    assert empty.exit_code == 2 and "no training records" in empty.output


def test_flow_exports_from_the_table_then_trains(tmp_path, settings):
    from instruction_fixtures import make_rows, write_table

    from flows.finetune import finetune_flow

    write_table(settings.db, make_rows(tmp_path / "dump", 0, 6))
    settings = settings.model_copy(update={"table_suffix": ""})
    result = finetune_flow.fn(str(tmp_path / "ds"), str(tmp_path / "ft"),
                              {"max_steps": 1, "batch_size": 2, "grad_accum": 1},
                              settings, export_options={"val_fraction": 0.0})
    assert result["export"]["records"] == {"train": 6, "val": 0}
    assert result["finetune"]["steps"] == 1 and result["finetune"]["train_records"] == 6
    assert Path(result["finetune"]["adapter"], "adapter_model.safetensors").is_file()
    with pytest.raises(ValueError, match="unknown finetune options"):
        finetune_flow.fn(str(tmp_path / "ds"), str(tmp_path / "x"), {"epoch": 1}, settings,
                         export=False)


def test_epochs_step_on_partial_accumulation_and_empty_labels_fail(trained, base, dataset):
    processor, records = trained["processor"], trained["records"]
    cfg = FinetuneConfig(base=base, epochs=2, batch_size=1, grad_accum=3, warmup_ratio=0.0)
    assert total_steps(len(records), cfg) == 4  # 4 batches / 3 per step -> 2 steps per epoch
    steps: list[int] = []
    losses = train(build_model(cfg, base, "cpu"), records, processor, dataset / "images", cfg,
                   "cpu", lambda step, _: steps.append(step))
    assert steps == [1, 2, 3, 4] and len(losses) == 4
    short = FinetuneConfig(base=base, max_length=10, max_steps=1)  # the image alone is longer
    with pytest.raises(FinetuneError, match="max-length"):
        train(build_model(short, base, "cpu"), records, processor, dataset / "images", short,
              "cpu", lambda *_: None)
