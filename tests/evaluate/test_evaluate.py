"""``mmrag evaluate``: metrics proven on cases whose answer is known whatever the (random) weights.

The images table is built in-process (tiny CLIP, no Ray) from hand-made photos with chosen
captions: a caption no other row shares, two rows sharing one caption, a caption with quotes.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import shutil
import subprocess
import sys
from datetime import UTC, datetime
from types import SimpleNamespace

import lancedb
import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from flows.config import clip_spec
from flows.evaluate import headline
from schemas.metrics import METRICS_SCHEMA, SCHEMA_VERSION
from schemas.tables import images_schema
from tasks.evaluate.answer_checks import AnswersNotFound, answer_checks, clip_scores, load_answers
from tasks.evaluate.augment import IDENTITY, KINDS, augment
from tasks.evaluate.labelled_set import labelled_queries, sample_images
from tasks.evaluate.retrieval import (
    ann_vs_exact,
    evaluate_retrieval,
    metrics_table,
    mrr,
    overlap_at_k,
    parse_variant,
    read_metrics,
    recall_at_k,
    resolve_variants,
    search_variant,
    vector_index,
    write_metrics,
)
from tasks.io import store
from tasks.io.answers import write_answers
from tasks.io.images import decode
from tasks.models.clip import load_clip
from tasks.query.retrieve import pin_images

UNIQUE = "qwertyzebra plumbusfjord"
SHARED = "a leafy street with low houses"
CAPTIONS = [UNIQUE, SHARED, SHARED, 'it\'s a "quoted" caption; DROP TABLE images', None,
            *[f"a grey road with {w} cars" for w in ("two", "many", "red", "blue", "old",
                                                   "new", "parked")]]


def _photo(i: int) -> bytes:
    """A distinct picture per index: coloured bands over seeded noise."""
    rng = np.random.default_rng(100 + i)
    img = rng.integers(0, 255, (120, 160, 3), dtype=np.uint8)
    img[: 40 + 5 * i, :, i % 3] = 30 * i % 255
    out = io.BytesIO()
    Image.fromarray(img).save(out, "JPEG", quality=90)
    return out.getvalue()


@pytest.fixture(scope="module")
def world(tmp_path_factory, cache_dir):
    from mmrag.settings import Settings

    base = tmp_path_factory.mktemp("evaluate")
    settings = Settings(db=str(base / "db"), profile="tiny", cache_dir=str(cache_dir),
                        work_dir=str(base / "work"), out=str(base / "out"))
    spec = clip_spec(settings)
    clip = load_clip(spec)
    (base / "dump").mkdir()
    rows, vectors = [], []
    for i, caption in enumerate(CAPTIONS):
        data, path = _photo(i), base / "dump" / f"img{i:02d}.jpg"
        path.write_bytes(data)
        pixels = decode(data, clip.input_size, settings.max_image_pixels)[0]
        vectors.append(clip.encode_pixels(np.stack([pixels]))[0])
        rows.append({"image_id": hashlib.sha256(data).hexdigest(), "source_uri": str(path),
                     "rel_path": path.name, "file_name": path.name, "caption": caption,
                     "city": None if i == len(CAPTIONS) - 1 else ("Paris", "Lima")[i % 2],
                     "width": 160, "height": 120, "clip_model": spec.label, "run_id": "t",
                     "ingested_at": datetime.now(UTC), "vector": vectors[-1].tolist()})
    tables = store.open_tables(settings.db, clip.dim, spec.label)
    tables.images.add(pa.Table.from_pylist(rows, schema=images_schema(clip.dim)))
    store.refresh_indexes(tables)
    return SimpleNamespace(base=base, settings=settings, spec=spec, clip=clip, rows=rows,
                           vectors=np.stack(vectors))


def _pin(world, db=None):
    return pin_images(db or world.settings.db, world.clip.dim, world.spec.label)


def _metric(rows, task, metric, variant="default", subset=None, city=None):
    found = [r for r in rows if (r["task"], r["metric"], r["variant"], r["subset"],
                                 r["city"]) == (task, metric, variant, subset, city)]
    assert len(found) == 1, (task, metric, variant, subset, city)
    return found[0]


# --- pure metrics ---------------------------------------------------------------------------


def test_recall_and_mrr_on_hand_made_lists():
    ranked = [["a", "b", "c"], ["x", "y", "z"], ["q", "r", "s"]]
    relevant = [{"a"}, {"z", "y"}, {"nope"}]  # first relevant at rank 1, 2, never
    assert recall_at_k(ranked, relevant, 1) == pytest.approx(1 / 3)
    assert recall_at_k(ranked, relevant, 2) == recall_at_k(ranked, relevant, 3) == \
        pytest.approx(2 / 3)
    assert mrr(ranked, relevant) == pytest.approx((1 + 1 / 2 + 0) / 3)
    assert mrr(ranked, relevant, depth=1) == pytest.approx(1 / 3)
    assert math.isnan(recall_at_k([], [], 5)) and math.isnan(mrr([], []))
    with pytest.raises(ValueError):
        recall_at_k(ranked, relevant, 0)
    with pytest.raises(ValueError):
        mrr(ranked, relevant[:2])


def test_ann_overlap_on_hand_made_lists():
    approx = [["a", "b", "c"], ["d", "e"], ["f"]]
    exact = [["a", "c", "x"], ["d", "e"], []]  # the empty exact list is not scored
    assert overlap_at_k(approx, exact, 3) == pytest.approx((2 / 3 + 2 / 2) / 2)
    assert overlap_at_k(approx, exact, 1) == 1.0
    assert overlap_at_k([["b", "a"]], [["a", "b"]], 1) == 0.0


def test_variants_parse_and_lay_over_the_settings_options():
    name, opts = parse_variant("rerank=rerank_weight:0.5,rerank_depth:50")
    assert (name, opts) == ("rerank", {"rerank_weight": 0.5, "rerank_depth": 50})
    base = {"nprobes": 20, "refine_factor": 5}
    variants = resolve_variants(["rerank=rerank_weight:0.5", "raw=refine_factor:none,x:abc"],
                                base)
    assert variants == {"default": base,
                        "rerank": {"nprobes": 20, "refine_factor": 5, "rerank_weight": 0.5},
                        "raw": {"nprobes": 20, "refine_factor": None, "x": "abc"}}
    for bad in ("noequals", "bad name=a:1", "v=a", "v=a:nan", "=a:1"):
        with pytest.raises(ValueError):
            parse_variant(bad)
    with pytest.raises(ValueError, match="twice"):
        resolve_variants(["a=x:1", "a=x:2"], base)


def test_augmentations_are_seeded_and_change_the_photo():
    data = _photo(3)
    assert augment(data, IDENTITY, 0, "k") is data
    for kind in KINDS:
        copy = augment(data, kind, 7, "key")
        assert copy == augment(data, kind, 7, "key") != augment(data, kind, 8, "key")
        assert copy[:2] == (b"\xff\xd8" if kind in ("jpeg", "combined") else b"\x89P")
        size = Image.open(io.BytesIO(copy)).size
        assert size == (160, 120) if kind in ("jpeg", "jitter") else size < (160, 120)
    with pytest.raises(ValueError):
        augment(data, "rotate", 0, "k")


# --- the labelled set and retrieval metrics -------------------------------------------------


def test_sample_is_seeded_and_captions_define_relevance(world):
    pinned = _pin(world)
    ids = sorted(r["image_id"] for r in world.rows)
    assert sample_images(pinned, 100, 0)["image_id"].to_list() == ids
    five = sample_images(pinned, 5, 1)["image_id"].to_list()
    assert five == sample_images(pinned, 5, 1)["image_id"].to_list() != \
        sample_images(pinned, 5, 2)["image_id"].to_list()
    queries = labelled_queries(pinned, world.clip, sample_images(pinned, 100, 0), [IDENTITY],
                               0, world.settings.max_image_pixels)
    text = queries.filter(pl.col("task") == "text2image")
    assert sorted(text["text"].to_list()) == sorted({c for c in CAPTIONS if c})  # deduped
    by_text = {r["text"]: r for r in text.iter_rows(named=True)}
    owners = sorted(r["image_id"] for r in world.rows if r["caption"] == SHARED)
    assert by_text[SHARED]["relevant"] == owners and len(owners) == 2
    assert by_text[CAPTIONS[3]]["relevant"] == [world.rows[3]["image_id"]]
    assert queries.filter(pl.col("task") == "hybrid").height == text.height
    assert queries.filter(pl.col("task") == "image2image").height == len(CAPTIONS)
    both = queries.filter(pl.col("task") == "hybrid_image")  # one per captioned image
    assert both.height == sum(1 for c in CAPTIONS if c and c.strip())
    for q in both.iter_rows(named=True):
        assert q["relevant"] == [q["target"]] and q["subset"] == IDENTITY
        assert CAPTIONS[[r["image_id"] for r in world.rows].index(q["target"])] \
            .startswith(q["text"])
    same = queries.filter(pl.col("task") == "image2image").join(
        both.select("target", hv="vector"), on="target")
    assert (same["vector"] == same["hv"]).all()  # the same embedded copy, not a re-embedding


def _expected(world, text_rows):
    """recall@k / MRR from a numpy brute force over the stored vectors, not through LanceDB."""
    ids = [r["image_id"] for r in world.rows]
    ranks = []
    for q in text_rows:
        order = np.argsort(-(world.vectors @ np.asarray(q["vector"])))
        ranks.append(min(int(np.flatnonzero(order == ids.index(i))[0]) + 1
                         for i in q["relevant"]))
    ranks = np.array(ranks)
    return {**{f"recall@{k}": float(np.mean(ranks <= k)) for k in (1, 5, 10)},
            "mrr": float(np.mean(np.where(ranks <= 10, 1.0 / ranks, 0.0)))}


def test_text_and_identity_image_metrics_are_right(world):
    pinned = _pin(world)
    queries = labelled_queries(pinned, world.clip, sample_images(pinned, 100, 0), [IDENTITY],
                               0, world.settings.max_image_pixels)
    rows = evaluate_retrieval(pinned, queries, {"default": {}, "wide": {"nprobes": 50}})
    text = queries.filter(pl.col("task") == "text2image").to_dicts()
    for metric, value in _expected(world, text).items():
        assert _metric(rows, "text2image", metric)["value"] == pytest.approx(value, abs=1e-9)
    paris = [q for q in text if q["city"] == "Paris"]
    assert _metric(rows, "text2image", "mrr", city="Paris")["value"] == \
        pytest.approx(_expected(world, paris)["mrr"])
    assert _metric(rows, "text2image", "mrr", city="Paris")["n_queries"] == len(paris)
    for variant in ("default", "wide"):  # identical copies find their original first
        for subset in (None, IDENTITY):
            one = _metric(rows, "image2image", "recall@1", variant, subset)
            assert (one["value"], one["n_queries"]) == (1.0, len(CAPTIONS))
        assert _metric(rows, "image2image", "mrr", variant)["value"] == 1.0
        assert _metric(rows, "image2image", "errors", variant)["value"] == 0
        ann = _metric(rows, "ann_vs_exact", "recall@10", variant, "no_index")
        assert ann["value"] == 1.0 and ann["n_queries"] == len(text) + len(CAPTIONS)
    assert '"nprobes": 50' in _metric(rows, "hybrid", "mrr", "wide")["search_opts"]
    table = metrics_table(rows)
    assert table.schema.metadata[b"mmrag.schema_version"] == SCHEMA_VERSION.encode()


def test_hybrid_full_text_finds_the_caption_only_one_row_has(world):
    pinned = _pin(world)
    queries = labelled_queries(pinned, world.clip, sample_images(pinned, 100, 0), [], 0,
                               world.settings.max_image_pixels)
    hybrid = queries.filter(pl.col("task") == "hybrid", pl.col("text") == UNIQUE)
    ranked = search_variant(pinned, hybrid, {})
    # only this row matches the words: its fused score is at least every other row's
    assert world.rows[0]["image_id"] in ranked["ranked"][0][:2]
    assert ranked["search_error"].to_list() == [None]


def test_missing_source_file_is_an_error_not_a_miss(world, tmp_path):
    pinned = _pin(world)
    sample = sample_images(pinned, 100, 0).with_columns(
        source_uri=pl.when(pl.col("image_id") == world.rows[5]["image_id"])
        .then(pl.lit(str(tmp_path / "gone.jpg"))).otherwise(pl.col("source_uri")))
    queries = labelled_queries(pinned, world.clip, sample, [IDENTITY], 0,
                               world.settings.max_image_pixels)
    rows = evaluate_retrieval(pinned, queries, {"default": {}})
    assert _metric(rows, "image2image", "errors")["value"] == 1
    assert _metric(rows, "image2image", "recall@1")["value"] == 1.0
    assert _metric(rows, "image2image", "recall@1")["n_queries"] == len(CAPTIONS) - 1


def test_ann_index_against_exact_search(world, tmp_path):
    db = str(tmp_path / "db")
    shutil.copytree(world.settings.db, db)
    from lancedb.index import IvfSq

    lancedb.connect(db).open_table("images").create_index(
        "vector", config=IvfSq(num_partitions=2, distance_type="cosine"))
    pinned = _pin(world, db)
    assert vector_index(pinned.table) == "IvfSq" and vector_index(_pin(world).table) is None
    queries = labelled_queries(pinned, world.clip, sample_images(pinned, 100, 0), [IDENTITY],
                               0, world.settings.max_image_pixels)
    # every partition probed and a refine step over all rows: the ANN search is exact
    rows = ann_vs_exact(pinned, queries, {"nprobes": 2, "refine_factor": 50}, "all")
    assert [(r["subset"], r["metric"], r["value"]) for r in rows] == [
        ("IvfSq", f"recall@{k}", 1.0) for k in (1, 5, 10)]


# --- answer checks and the metrics file -----------------------------------------------------


def _hits(world, idx):
    return [{"rank": n, "image_id": world.rows[i]["image_id"], "city": world.rows[i]["city"]}
            for n, i in enumerate(idx, 1)]


def _answers(world, out, run_id="fab"):
    base = {"run_id": run_id, "generator": "transformers", "query_text": "leafy street"}
    rows = [
        {"query_id": "ok", "answer": "Trees [1] and cars [2].", "retrieved": _hits(world, [0, 1])},
        {"query_id": "fake", "answer": "Safe, see [7].", "retrieved": _hits(world, [2, 3, 4])},
        {"query_id": "empty", "answer": "   ", "retrieved": _hits(world, [5])},
        {"query_id": "long", "answer": "x" * 700, "retrieved": _hits(world, [6])},
        {"query_id": "gen", "error": "boom", "error_stage": "generate", "retrieved": []},
        {"query_id": "bad", "error": "no text", "error_stage": "query", "query_text": None},
    ]
    return write_answers([base | r for r in rows], out, "2026-01-04", run_id)


def test_answer_checks_count_fabricated_citations_and_bad_answers(world, tmp_path):
    path = _answers(world, str(tmp_path / "out"))
    frame = load_answers("fab", str(tmp_path / "out"))
    assert load_answers(path, "unused").height == frame.height == 6
    got = {(r["metric"], r["subset"]): (r["value"], r["n_queries"])
           for r in answer_checks(frame, max_chars=600)}
    assert got == {
        ("error_rate", "query"): (1 / 6, 6), ("error_rate", "retrieve"): (0.0, 6),
        ("error_rate", "generate"): (1 / 6, 6),
        ("empty_answer", None): (1 / 4, 4),            # ok, fake, empty, long were generated
        ("cites_only_retrieved", None): (2 / 3, 3),    # "fake" cites [7] of 3 items
        ("no_citation", None): (1 / 3, 3), ("too_long_answer", None): (1 / 3, 3),
    }
    for ref, error in (("nope", AnswersNotFound), ("bad id!", ValueError),
                       (str(tmp_path / "no.parquet"), AnswersNotFound)):
        with pytest.raises(error):
            load_answers(ref, str(tmp_path / "out"))


def test_clip_score_re_embeds_the_files_of_retrieved_images(world, tmp_path):
    _answers(world, str(tmp_path / "out"))
    frame = load_answers("fab", str(tmp_path / "out"))
    frame = frame.with_columns(retrieved=pl.when(pl.col("query_id") == "ok").then(
        pl.col("retrieved").list.concat(pl.lit([{"rank": 3, "image_id": "f" * 64}],
                                               dtype=frame.schema["retrieved"])))
        .otherwise(pl.col("retrieved")))
    rows = clip_scores(frame, _pin(world).table, world.clip, world.settings.max_image_pixels)
    text = world.clip.encode_texts(["leafy street"])[0]
    used = [0, 1, 2, 3, 4, 5, 6]  # every hit of an answer without error; "f"*64 is unknown
    sims = {i: float(world.vectors[i] @ text) for i in used}
    got = {(r["metric"], r["city"]): (r["value"], r["n_queries"]) for r in rows}
    assert got[("clip_score_missing", None)] == (1, len(used) + 1)
    assert got[("clip_score", None)][0] == pytest.approx(np.mean(list(sims.values())), abs=1e-5)
    lima = [sims[i] for i in used if world.rows[i]["city"] == "Lima"]
    assert got[("clip_score", "Lima")] == (pytest.approx(np.mean(lima), abs=1e-5), len(lima))


def test_metrics_file_is_atomic_versioned_and_replaced(tmp_path):
    out = str(tmp_path / "out")
    row = {"eval_id": "e1", "task": "hybrid", "variant": "default", "metric": "mrr",
           "value": 0.5, "n_queries": 4}
    path = write_metrics([row], out, "2026-01-05", "e1")
    assert path.endswith("/metrics/run_date=2026-01-05/e1.parquet")
    assert pq.read_schema(path).metadata[b"mmrag.schema_version"] == SCHEMA_VERSION.encode()
    write_metrics([row | {"value": 0.25}], out, "2026-01-05", "e1")
    back = read_metrics(out).collect()
    assert back["value"].to_list() == [0.25] and str(back["run_date"][0]) == "2026-01-05"
    assert set(METRICS_SCHEMA.names) <= set(back.columns)
    assert os.listdir(os.path.dirname(path)) == ["e1.parquet"]
    with pytest.raises(ValueError, match="outside"):
        write_metrics([row | {"recall": 1}], out, "2026-01-05", "e2")
    with pytest.raises(ValueError):
        write_metrics([row], out, "2026-01-05", "../e3")
    assert read_metrics(str(tmp_path / "empty")).collect().is_empty()


def test_headline_keeps_overall_lines():
    rows = [{"task": "text2image", "variant": "d", "subset": None, "city": None,
             "metric": m, "value": v, "n_queries": 4} for m, v in (("recall@1", 0.25),
                                                                   ("errors", 1.0))]
    rows += [{"task": "text2image", "variant": "d", "subset": None, "city": "Lima",
              "metric": "recall@1", "value": 1.0, "n_queries": 1},
             {"task": "ann_vs_exact", "variant": "d", "subset": "no_index", "city": None,
              "metric": "recall@10", "value": 1.0, "n_queries": 4}]
    assert headline(rows) == [
        {"task": "text2image", "variant": "d", "index": None, "errors": 1, "recall@1": 0.25,
         "queries": 4},
        {"task": "ann_vs_exact", "variant": "d", "index": "no_index", "errors": 0,
         "recall@10": 1.0, "queries": 4}]


# --- the command ----------------------------------------------------------------------------


def _cli(args, world, **env):
    full = os.environ | {"MMRAG_PROFILE": "tiny", "MMRAG_DB": world.settings.db,
                         "MMRAG_CACHE_DIR": world.settings.cache_dir,
                         "MMRAG_WORK_DIR": str(world.base / "w"),
                         "MMRAG_OUT": str(world.base / "out")} | env
    return subprocess.run([sys.executable, "-m", "mmrag.cli", "evaluate", *args], env=full,
                          capture_output=True, text=True, timeout=600, cwd=world.base)


def test_cli_bad_input_is_a_one_line_error_before_prefect(world, monkeypatch):
    from typer.testing import CliRunner

    from mmrag.cli import app

    env = {"MMRAG_PROFILE": "tiny", "MMRAG_DB": world.settings.db,
           "MMRAG_CACHE_DIR": world.settings.cache_dir, "MMRAG_OUT": str(world.base / "out")}
    monkeypatch.setattr("flows.evaluate.evaluate_flow", None)  # must never be reached
    for args in (["--variant", "no-equals"], ["--answers", "missing-run"],
                 ["--sample", "0"], ["--augment", "rotate"], ["--eval-id", "../x"]):
        r = CliRunner().invoke(app, ["evaluate", *args], env=env)
        assert r.exit_code == 2 and len(r.stderr.strip().splitlines()) == 1, (args, r.output)
        assert r.stderr.startswith("error: ")


@pytest.mark.slow
def test_cli_evaluates_variants_and_answers(world):
    _answers(world, str(world.base / "out"), "demo")
    r = _cli(["--sample", "6", "--seed", "3", "--answers", "demo", "--clip-score",
              "--variant", "wide=nprobes:50,refine_factor:10", "--eval-id", "cli",
              "--run-date", "2026-01-06", "--augment", "identity,jpeg"], world)
    assert r.returncode == 0, r.stderr[-3000:]
    path = world.base / "out" / "metrics" / "run_date=2026-01-06" / "cli.parquet"
    assert str(path) in r.stdout and "evaluation cli: 6 sampled images" in r.stdout
    metrics = pl.read_parquet(path)
    assert set(metrics["variant"].drop_nulls()) == {"default", "wide"}
    assert set(metrics["task"]) == {"text2image", "image2image", "hybrid", "hybrid_image",
                                    "ann_vs_exact", "answers"}
    identity = metrics.filter(pl.col("task") == "image2image", pl.col("subset") == IDENTITY,
                              pl.col("metric") == "recall@1", pl.col("city").is_null())
    assert identity["value"].to_list() == [1.0, 1.0] and set(identity["n_queries"]) == {6}
    assert set(metrics["eval_id"]) == {"cli"} and set(metrics["sample"]) == {6}
    cites = metrics.filter(pl.col("metric") == "cites_only_retrieved")
    assert cites["value"].to_list() == [pytest.approx(2 / 3)]
    assert cites["answers_run_id"].to_list() == ["demo"]
    for line in ("text2image", "image2image", "hybrid", "hybrid_image", "ann_vs_exact"):
        assert sum(ln.split()[:1] == [line] for ln in r.stdout.splitlines()) == 2
    assert "cites_only_retrieved 0.667" in r.stdout
