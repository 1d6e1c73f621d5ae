"""Instruction export: LLaVA format, answers derived from the table, stable leak-free splits."""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import polars as pl
import pytest
from instruction_fixtures import make_rows, write_table
from PIL import Image

from schemas.instructions import IMAGE_TOKEN, InstructionRecord, safe_relative
from schemas.tables import SCORE_COLUMNS
from tasks.adapt.answer_records import select_answers
from tasks.adapt.export import (
    SCORE_WORDS,
    ExportOptions,
    InstructionError,
    export_instructions,
    load_split,
    split_of,
)
from tasks.io.answers import write_answers

VAL = 0.3


@pytest.fixture
def table(tmp_path):
    db, dump = str(tmp_path / "db"), tmp_path / "dump"
    rows = make_rows(dump, 0, 30)
    write_table(db, rows)
    return db, dump, rows


def _export(db, out, **kw):
    answers = kw.pop("answers", None)
    return export_instructions(db, "images", out, ExportOptions(val_fraction=VAL, **kw), answers)


def _records(out: Path) -> dict[str, list[dict]]:
    return {s: json.loads((out / f"{s}.json").read_text()) for s in ("train", "val")}


def _by_image(out: Path) -> dict[str, tuple[str, dict]]:
    """image_id → (split, record) for records made from table rows."""
    found = {}
    for split, recs in _records(out).items():
        for r in recs:
            if not r["id"].startswith("answer-"):
                found[Path(r["image"]).stem] = (split, r)
    return found


def test_every_record_is_valid_llava_with_its_image(table, tmp_path):
    db, _, rows = table
    out = tmp_path / "out"
    manifest = _export(db, out)
    recs = _records(out)
    assert manifest["records"] == {s: len(recs[s]) for s in recs}
    assert sum(manifest["records"].values()) == len(rows)  # every row has something to ask
    for rec in recs["train"] + recs["val"]:
        InstructionRecord.model_validate(rec)
        first = rec["conversations"][0]
        assert first["from"] == "human" and first["value"].startswith(IMAGE_TOKEN + "\n")
        assert sum(t["value"].count(IMAGE_TOKEN) for t in rec["conversations"]) == 1
        path = out / "images" / rec["image"]
        assert path.is_file() and path.resolve().is_relative_to(out.resolve())
        assert hashlib.sha256(path.read_bytes()).hexdigest() == path.stem


def test_schema_rejects_malformed_records():
    good = {"id": "a-1", "image": "ab/x.jpg", "conversations": [
        {"from": "human", "value": "<image>\nQ?"}, {"from": "gpt", "value": "A."}]}
    InstructionRecord.model_validate(good)
    bad = [
        {**good, "image": "../x.jpg"}, {**good, "image": "/etc/x.jpg"}, {**good, "image": ".h/x"},
        {**good, "conversations": good["conversations"][:1]},
        {**good, "conversations": [{"from": "human", "value": "Q? <image>"},
                                   {"from": "gpt", "value": "A."}]},
        {**good, "conversations": [*good["conversations"],
                                   {"from": "human", "value": "<image>\nagain"},
                                   {"from": "gpt", "value": "B."}]},
        {**good, "conversations": [good["conversations"][1], good["conversations"][0]]},
        {**good, "extra": 1},
    ]
    for record in bad:
        with pytest.raises(ValueError):
            InstructionRecord.model_validate(record)
    assert not safe_relative("a/../b") and not safe_relative("") and safe_relative("ab/c.png")


def test_answers_are_the_table_values(table, tmp_path):
    db, _, rows = table
    out = tmp_path / "out"
    _export(db, out)
    exported = _by_image(out)
    for row in rows:
        _, rec = exported[row["image_id"]]
        text = " ".join(t["value"] for t in rec["conversations"])
        answers = [t["value"] for t in rec["conversations"][1::2]]
        if row["caption"]:
            assert answers[0] == row["caption"].splitlines()[0]
        assert (f"This photo was taken in {row['city']}." in answers) == (row["city"] is not None)
        for col in SCORE_COLUMNS:
            value = row[col]
            mentioned = f"({col} score" in text
            assert mentioned == (value is not None)
            if value is None:
                continue
            values = [r[col] for r in rows if r[col] is not None]
            pct = round(100 * sum(v < value for v in values) / len(values))
            comparative = SCORE_WORDS[col][1]
            assert (f"It looks {comparative} than {pct}% of the {len(values)} places in this "
                    f"dataset ({col} score {value:.2f}).") in answers


def test_split_is_stable_when_rows_are_added_and_never_leaks(table, tmp_path):
    db, dump, rows = table
    first = tmp_path / "first"
    _export(db, first)
    before = {iid: split for iid, (split, _) in _by_image(first).items()}
    assert {"train", "val"} == set(before.values())
    assert before == {r["image_id"]: split_of(r["image_id"], VAL) for r in rows}
    text = {s: (first / f"{s}.json").read_bytes() for s in ("train", "val")}
    _export(db, first)  # re-run into the same folder: identical files
    assert text == {s: (first / f"{s}.json").read_bytes() for s in ("train", "val")}

    write_table(db, make_rows(dump, 30, 20))
    second = tmp_path / "second"
    _export(db, second)
    after = {iid: split for iid, (split, _) in _by_image(second).items()}
    assert len(after) == 50 and all(after[i] == s for i, s in before.items())
    recs = _records(second)
    images = {s: {r["image"] for r in recs[s]} for s in recs}
    assert not images["train"] & images["val"]
    ids = [r["id"] for s in recs for r in recs[s]]
    assert len(ids) == len(set(ids))


def test_split_fraction_and_seed():
    ids = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(4000)]
    share = sum(split_of(i, 0.2) == "val" for i in ids) / len(ids)
    assert 0.17 < share < 0.23
    assert all(split_of(i, 0.0) == "train" for i in ids[:100])
    moved = sum(split_of(i, 0.2, seed=0) != split_of(i, 0.2, seed=1) for i in ids)
    assert moved > 400  # another seed is another split


def test_link_copy_limit_and_changed_files(table, tmp_path):
    db, _, rows = table
    linked, copied = tmp_path / "linked", tmp_path / "copied"
    _export(db, linked, limit=5)
    _export(db, copied, limit=5, mode="copy")
    first5 = sorted(r["image_id"] for r in rows)[:5]
    assert sorted(_by_image(linked)) == first5
    src = {r["image_id"]: Path(r["source_uri"]) for r in rows}
    for iid, (_, rec) in _by_image(linked).items():
        assert os.path.samefile(linked / "images" / rec["image"], src[iid])  # a hardlink
    for iid, (_, rec) in _by_image(copied).items():
        dst = copied / "images" / rec["image"]
        assert not os.path.samefile(dst, src[iid]) and dst.read_bytes() == src[iid].read_bytes()

    changed = sorted(rows, key=lambda r: r["image_id"])[0]
    Path(changed["source_uri"]).write_bytes(b"edited after ingest")
    manifest = _export(db, tmp_path / "third", limit=5)
    assert manifest["skipped"] == {"image changed": 1}
    assert changed["image_id"] not in _by_image(tmp_path / "third")


def _answer_rows(rows: list[dict]) -> list[dict]:
    """Five answers: one usable per split-consistent grid, and one of each skip reason."""
    by_split: dict[str, list[dict]] = {"train": [], "val": []}
    for r in rows:
        by_split[split_of(r["image_id"], VAL)].append(r)

    def hits(rs):
        return [{"rank": i + 1, "image_id": r["image_id"], "source_uri": r["source_uri"]}
                for i, r in enumerate(rs)]

    base = {"run_id": "run1", "mode": "text", "top_k": 2, "prompt": "Context...\nQuestion: q?",
            "generator": "transformers", "answer": "Both streets look safe [1]."}
    train2, mixed = by_split["train"][:2], [by_split["train"][0], by_split["val"][0]]
    return [
        {**base, "query_id": "good", "retrieved": hits(train2),
         "prompt_images": [r["image_id"] for r in train2]},
        {**base, "query_id": "val1", "retrieved": hits(by_split["val"][:1]),
         "prompt_images": [by_split["val"][0]["image_id"]]},
        {**base, "query_id": "mixed", "retrieved": hits(mixed),
         "prompt_images": [r["image_id"] for r in mixed]},
        {**base, "query_id": "failed", "retrieved": hits(train2), "answer": None,
         "prompt_images": [r["image_id"] for r in train2], "error": "generate: boom"},
        {**base, "query_id": "photo", "retrieved": hits(train2), "query_image": "q.jpg",
         "prompt_images": [r["image_id"] for r in train2]},
    ]


def test_answers_export_reviewed_rows_with_their_grid(table, tmp_path):
    db, _, rows = table
    answers_root = str(tmp_path / "answers")
    write_answers(_answer_rows(rows), answers_root, "2026-11-20", "run1")
    frame = select_answers(answers_root, ["run1"])
    assert sorted(frame["query_id"]) == ["good", "mixed", "photo", "val1"]  # error dropped
    out = tmp_path / "out"
    manifest = _export(db, out, answers=frame)
    assert manifest["skipped"] == {"answer grid spans both splits": 1,
                                   "answer has a query photo": 1}
    answer_recs = {s: [r for r in recs if r["id"].startswith("answer-")]
                   for s, recs in _records(out).items()}
    assert [len(answer_recs["train"]), len(answer_recs["val"])] == [1, 1]
    rec = answer_recs["train"][0]
    assert rec["conversations"][0]["value"] == "<image>\nContext...\nQuestion: q?"
    assert rec["conversations"][1]["value"] == "Both streets look safe [1]."
    with Image.open(out / "images" / rec["image"]) as grid:
        from tasks.query.run import GRID_SIZE

        assert grid.size == (GRID_SIZE, GRID_SIZE)

    reviewed = tmp_path / "reviewed.csv"
    pl.DataFrame({"run_id": ["run1", "run1"], "query_id": ["good", "failed"],
                  "answer": ["Corrected: both look safe [1][2].", "x"]}).write_csv(reviewed)
    kept = select_answers(answers_root, ["run1"], reviewed)
    assert kept["query_id"].to_list() == ["good"]  # a failed row stays out even if listed
    assert kept["answer"].to_list() == ["Corrected: both look safe [1][2]."]
    with pytest.raises(InstructionError, match="no answers for run"):
        select_answers(answers_root, ["run1", "nope"])


def test_load_split_round_trip(table, tmp_path):
    db, _, _ = table
    _export(db, tmp_path / "out")
    loaded = load_split(tmp_path / "out", "train")
    assert loaded and all(isinstance(r, InstructionRecord) for r in loaded)
    assert [r.to_json() for r in loaded] == _records(tmp_path / "out")["train"]


def test_cli_export_and_errors(table, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from mmrag.cli import app

    db, _, _ = table
    monkeypatch.setenv("MMRAG_TABLE_SUFFIX", "")
    runner = CliRunner()
    out = tmp_path / "cli"
    result = runner.invoke(app, ["--db", db, "export-instructions", str(out), "--val-fraction",
                                 "0.3", "--copy", "--limit", "10"])
    assert result.exit_code == 0, result.output
    counts = re.search(r"wrote (\d+) train / (\d+) val records", result.output)
    assert int(counts[1]) + int(counts[2]) == 10
    assert json.loads((out / "export.json").read_text())["mode"] == "copy"
    bad = runner.invoke(app, ["--db", db, "export-instructions", str(out), "--answers", "nope",
                              "--answers-root", str(tmp_path / "none")])
    assert bad.exit_code == 2 and "no answers for run(s) nope" in bad.output
    bad = runner.invoke(app, ["--db", str(tmp_path / "empty"), "export-instructions", str(out)])
    assert bad.exit_code == 2 and "no 'images' table" in bad.output
