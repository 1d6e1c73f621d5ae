"""The query flow end to end on the tiny models: real Ray ingest, real LanceDB, real LLaVA code."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import lancedb
import polars as pl
import pytest

from flows.ingest import ingest_flow
from flows.query import query_flow
from tasks.io.answers import read_answers

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def world(tmp_path_factory, sample_dump, cache_dir, ray_session):
    from mmrag.settings import Settings

    base = tmp_path_factory.mktemp("query")
    dump = base / "dump"
    shutil.copytree(sample_dump, dump)
    settings = Settings(db=str(base / "db"), profile="tiny", cache_dir=str(cache_dir),
                        work_dir=str(base / "work"), out=str(base / "out"), max_new_tokens=6,
                        embed_actor_cpus=0.5, decode_cpus=0.25)
    ingest_flow.fn(str(dump), settings)
    images = lancedb.connect(settings.db).open_table("images").to_polars().collect()
    return base, dump, settings, images


def _queries(base, rows, name="q.jsonl"):
    path = base / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _answers(settings, run_id):
    return read_answers(settings.out).filter(pl.col("run_id") == run_id).collect()


def test_every_query_gets_one_row_with_provenance(world):
    base, dump, settings, images = world
    city = images["city"][0]
    photo = images["source_uri"][3]
    rows = [
        {"query_id": "t", "text": "a street with trees", "top_k": 3},
        {"query_id": "c", "text": "is it safe?", "city": city, "min_safer": 0},
        {"query_id": "i", "image": photo, "top_k": 2},
        {"query_id": "inj", "text": "x", "city": "x' OR '1'='1"},
        {"query_id": "bad"},
    ]
    settings = settings.model_copy(update={"query_image_roots": [str(dump)]})
    summary = query_flow.fn(_queries(base, rows), settings, "run-a", "2026-01-02")
    out = _answers(settings, "run-a").sort("query_id")
    assert out["query_id"].to_list() == ["bad", "c", "i", "inj", "t"]
    by = {r["query_id"]: r for r in out.iter_rows(named=True)}
    version = lancedb.connect(settings.db).open_table("images").version
    assert set(out["table_version"]) == {version} == {summary["table_version"]}
    assert len(by["t"]["retrieved"]) == 3 and by["t"]["answer"] and by["t"]["error"] is None
    assert {h["city"] for h in by["c"]["retrieved"]} == {city}
    assert len(by["c"]["retrieved"]) == min(5, (images["city"] == city).sum())
    top = by["i"]["retrieved"][0]
    assert top["source_uri"] == photo and top["similarity"] == pytest.approx(1.0, abs=1e-3)
    assert by["inj"]["retrieved"] == [] and "''1''=''1'" in by["inj"]["filter"]
    assert by["bad"]["error_stage"] == "query" and "no text and no image" in by["bad"]["error"]
    assert by["t"]["prompt"].count("<context>") == 1 and by["t"]["n_generated_tokens"] > 0
    assert out["run_date"].cast(pl.String).unique().to_list() == ["2026-01-02"]
    opts = json.loads(by["t"]["search_options"])
    assert opts["nprobes"] == settings.nprobes and opts["rerank_weight"] == settings.rerank_weight
    assert by["t"]["raw_answer"] is not None and by["t"]["boxes"] is not None


def test_hybrid_finds_the_caption_match(world):
    base, _, settings, images = world
    word = "zebracrossingxyz"
    target = images["image_id"][5]
    table = lancedb.connect(settings.db).open_table("images")
    table.update(where=f"image_id = '{target}'", values={"caption": f"a {word} here"})
    table.create_index("caption", config=__import__("lancedb").index.FTS(), replace=True)
    # the two-space hybrid (image vectors + full text): with the caption space too, two random
    # spaces agreeing on other rows can outvote a hit only full text finds (RRF at top_k 3)
    settings = settings.model_copy(update={"engine": "none", "hybrid_spaces": "image+text"})
    query_flow.fn(_queries(base, [{"query_id": "h", "text": word, "mode": "hybrid",
                                   "top_k": 3}]), settings, "run-h", None)
    answer = _answers(settings, "run-h")
    hit = answer["retrieved"][0]
    assert target in [h["image_id"] for h in hit]
    assert "text" in next(h["spaces"] for h in hit if h["image_id"] == target)
    assert json.loads(answer["search_options"][0])["spaces_used"] == ["image", "text"]


def test_engine_none_rerun_replaces_and_version_is_pinned(world):
    base, dump, settings, _ = world
    settings = settings.model_copy(update={"engine": "none"})
    q = _queries(base, [{"query_id": "a", "text": "grey sky", "top_k": 4}], "pin.jsonl")
    first = query_flow.fn(q, settings, "run-p", "2026-01-03")
    out = _answers(settings, "run-p")
    assert out["answer"].to_list() == [None] and out["prompt"][0].startswith("You are given")
    again = query_flow.fn(q, settings, "run-p", "2026-01-03")
    files = list((base / "out" / "answers" / "run_date=2026-01-03").glob("*.parquet"))
    assert [f.name for f in files] == ["run-p.parquet"]
    assert again["table_version"] == first["table_version"]
    table = lancedb.connect(settings.db).open_table("images")
    table.checkout(first["table_version"])
    assert table.count_rows() == 24


def test_query_with_a_lora_adapter_records_it(world, tmp_path, monkeypatch):
    """A LoRA adapter from mmrag finetune is applied by the transformers engine of the flow."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "adapt"))
    from finetune_fixtures import write_dataset

    from tasks.adapt.finetune import FinetuneConfig, finetune, resolve_base

    base, _, settings, _ = world
    model_dir = resolve_base("tiny", settings.cache_dir)
    cfg = FinetuneConfig(base=model_dir, rank=4, alpha=8, max_steps=2, batch_size=2,
                         grad_accum=1, warmup_steps=0, save_steps=None, eval_steps=None)
    summary = finetune(write_dataset(tmp_path / "ds"), tmp_path / "ft", cfg, settings.cache_dir,
                       device="cpu")
    adapter = str(summary["adapter"])
    tuned = settings.model_copy(update={"vlm_adapter": adapter})
    summary = query_flow.fn(_queries(base, [{"query_id": "t", "text": "a street"}], "a.jsonl"),
                            tuned, "run-lora", "2026-01-04")
    row = _answers(tuned, "run-lora").row(0, named=True)
    assert summary["errors"] == {} and row["error"] is None
    assert row["generator"] == "transformers"
    assert row["generator_model"] == f"{model_dir}+{adapter}"
    broken = tmp_path / "broken"  # proves the engine really loads what vlm_adapter names
    broken.mkdir()
    with pytest.raises(Exception, match="adapter|config|broken"):
        query_flow.fn(_queries(base, [{"query_id": "t", "text": "a street"}], "b.jsonl"),
                      settings.model_copy(update={"vlm_adapter": str(broken)}), "run-broken",
                      "2026-01-04")


def test_two_replicas_write_the_same_answers_as_one(world):
    """The generate stage on the local Ray: 1 or 2 engine replicas, byte-identical answers."""
    base, _, settings, _ = world
    questions = ["a street with trees", "where is the car?", "is it safe here?",
                 "a tall building", "which part looks busy?"]
    q = _queries(base, [{"query_id": f"r{i}", "text": t, "top_k": 3}
                        for i, t in enumerate(questions)], "replicas.jsonl")
    runs = {}
    for replicas in (1, 2):
        tuned = settings.model_copy(update={"gen_replicas": replicas, "gen_replica_cpus": 0.5,
                                            "gen_batch_size": 2})
        query_flow.fn(q, tuned, f"rep-{replicas}", "2026-01-05")
        runs[replicas] = _answers(tuned, f"rep-{replicas}").sort("query_id")
    one, two = runs[1], runs[2]
    assert one["error"].null_count() == len(questions) and one["answer"].null_count() == 0
    for column in ("raw_answer", "answer", "prompt", "n_prompt_tokens", "n_generated_tokens",
                   "n_context_dropped", "prompt_token_budget", "citations"):
        assert one[column].to_list() == two[column].to_list(), column
    assert (one["n_prompt_tokens"] <= one["prompt_token_budget"]).all()
    assert one["prompt_token_budget"].unique().to_list() == [4096 - settings.max_new_tokens]
