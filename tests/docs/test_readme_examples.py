"""The analysts' examples of docs/reference/outputs.md ("Reading the outputs"), executed as written
against a small database and answers dataset, their results compared with values computed here
from the fixture rows."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import pytest
from report_fixtures import build_db, run_rows, write_v1

from schemas.answers import SCHEMA_VERSION

ROOT = next(p for p in Path(__file__).resolve().parents if (p / "pyproject.toml").is_file())
PAGE = ROOT / "docs" / "reference" / "outputs.md"
EXAMPLE = re.compile(r"<!-- example: (\w+) -->\n```(python|sql)\n(.*?)```", re.DOTALL)
EXPECTED_EXAMPLES = {"polars_answers", "polars_tables", "duckdb_safer_per_city",
                     "duckdb_empty_answers", "duckdb_schema_versions", "duckdb_tables"}


def examples() -> list[tuple[str, str, str]]:
    return EXAMPLE.findall(PAGE.read_text())


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    """data/lancedb and data/out as the page names them: two runs (schema 1 and current) that
    searched version v of ``images``, then a later ingest of three more images."""
    import lancedb

    from mmrag.samples.dump import generate_sample_dump
    from tasks.io.answers import write_answers

    root = tmp_path_factory.mktemp("readme")
    generate_sample_dump(root / "dump", 12, seed=5, size=(320, 240))
    rows = build_db(root / "dump", root / "data/lancedb", root / "outside")
    images = lancedb.connect(str(root / "data/lancedb")).open_table("images")
    version = images.version
    answers = [r | {"table_version": version}
               for r in run_rows(rows["images"], rows["images"][9]["source_uri"])]
    write_answers(answers, str(root / "data/out"), "2026-11-30", "r1")
    write_v1(answers, root / "data/out", "2026-11-29", "old")
    later = [r | {"image_id": f"{i:064x}", "city": "Later"} for i, r in
             enumerate(rows["images"][:3])]
    images.add(later)
    runs = [a | {"run_id": run} for run in ("old", "r1") for a in answers]
    return {"root": root, "images": rows["images"] + later, "rejects": rows["rejects"],
            "runs": runs, "searched": len(rows["images"])}


@pytest.fixture(scope="module")
def results(outputs):
    import os

    import duckdb

    namespace: dict = {}
    cwd = os.getcwd()
    os.chdir(outputs["root"])
    try:
        for name, lang, code in examples():
            if lang == "python":
                exec(compile(code, f"outputs.md:{name}", "exec"), namespace)  # noqa: S102
            else:
                namespace[name] = duckdb.sql(code).pl()
    finally:
        os.chdir(cwd)
    return namespace


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def _close(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for k, (g, w) in ((k, (got[k], want[k])) for k in want):
        assert g[1:] == w[1:] and g[0] == pytest.approx(w[0], rel=1e-5), k


def test_every_example_is_found():
    assert {name for name, _, _ in examples()} == EXPECTED_EXAMPLES


def test_safer_per_city_of_retrieved_images(results, outputs):
    hits = [h for a in outputs["runs"] for h in a.get("retrieved") or []]
    want = {c: (_mean([h["safer"] for h in hits if h["city"] == c]),
                sum(1 for h in hits if h["city"] == c)) for c in {h["city"] for h in hits}}
    for frame in (results["safer_per_city"], results["duckdb_safer_per_city"]):
        got = {r["city"]: (r["mean_safer"], r["hits"]) for r in frame.to_dicts()}
        _close(got, want)
        assert frame["city"].to_list() == sorted(want)


def test_empty_answers(results, outputs):
    want = sorted((a["run_id"], a["query_id"]) for a in outputs["runs"]
                  if not (a.get("answer") or "").strip())
    assert len(want) == 4  # one blank and one null answer per run
    for frame in (results["empty_answers"], results["duckdb_empty_answers"]):
        assert list(zip(frame["run_id"], frame["query_id"], strict=True)) == want
    stages = dict(zip(results["empty_answers"]["query_id"],
                      results["empty_answers"]["error_stage"], strict=True))
    assert stages == {"lookalike": None, "bad-no-input": "query"}


def test_tables_per_city_and_rejects_by_stage(results, outputs):
    images = outputs["images"]
    want = {c: (_mean([i["safer"] for i in images if i["city"] == c]),
                sum(1 for i in images if i["city"] == c)) for c in {i["city"] for i in images}}
    got = {r["city"]: (r["mean_safer"], r["images"]) for r in
           results["images_per_city"].to_dicts()}
    _close(got, want)
    got_sql = {r["city"]: (r["mean_safer"], want[r["city"]][1]) for r in
               results["safer_by_image_city"].to_dicts()}
    _close(got_sql, want)
    stages = Counter(r["stage"] for r in outputs["rejects"])
    for frame in (results["rejects_by_stage"], results["rejects_by_stage_sql"]):
        assert dict(zip(frame["stage"], frame["rejects"], strict=True)) == stages


def test_time_travel_to_the_version_a_run_searched(results, outputs):
    assert results["rows_searched"] == outputs["searched"] < len(outputs["images"])


def test_schema_versions_from_the_file_metadata(results):
    frame = results["duckdb_schema_versions"]
    assert list(zip(frame["run_id"], frame["schema_version"], strict=True)) == [
        ("old", "1"), ("r1", SCHEMA_VERSION)]  # r1 is written now: the current version
