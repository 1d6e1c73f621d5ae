"""Queries file → query plan: formats, row errors, fatal errors, and the prefilter's escaping
proven against a real LanceDB table (including a property test over arbitrary city names)."""

from __future__ import annotations

import json
import os
import struct

import lancedb
import polars as pl
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from polars.testing import assert_frame_equal

from schemas.queries import INPUT_COLUMNS, QUERY_PLAN_SCHEMA
from tasks.query.queries import QueryFileError, build_where, read_queries

HOSTILE = "x' OR '1'='1"


@pytest.fixture
def root(tmp_path):
    """root/imgs/{a,b}.jpg allowed; root/secret.jpg outside; root/imgs/link.jpg → secret."""
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for path in (imgs / "a.jpg", imgs / "b.jpg", tmp_path / "secret.jpg"):
        path.write_bytes(b"never decoded here")
    os.symlink(tmp_path / "secret.jpg", imgs / "link.jpg")
    return tmp_path


def _write(path, rows: list[dict]) -> str:
    """Rows of strings (or None) in the format the suffix says, all columns as strings."""
    columns = list(dict.fromkeys(k for r in rows for k in r))
    frame = pl.DataFrame([{c: r.get(c) for c in columns} for r in rows],
                         schema=dict.fromkeys(columns, pl.String))
    suffix = path.suffix
    if suffix == ".csv":
        frame.write_csv(path)
    elif suffix == ".parquet":
        frame.write_parquet(path)
    elif suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        path.write_text(json.dumps(rows))
    return str(path)


def _read(root, rows, suffix=".csv", **kw):
    return read_queries(_write(root / f"queries{suffix}", rows), image_roots=[str(root / "imgs")],
                        **kw)


def _errors(plan: pl.DataFrame) -> dict[str, str | None]:
    """query_id → error of its first row."""
    out: dict[str, str | None] = {}
    for qid, error in zip(plan["query_id"], plan["error"], strict=True):
        out.setdefault(qid, error)
    return out


GOOD = [
    {"query_id": "t", "text": " red door ", "top_k": "3", "city": "Paris", "min_safer": "4.5"},
    {"query_id": "i", "image": "imgs/a.jpg", "max_wealthier": "7"},
    {"text": "tree", "image": "imgs/b.jpg", "mode": "HYBRID", "city": HOSTILE},
    {"query_id": "h", "text": "a bridge", "mode": "hybrid", "top_k": "7.0"},
]


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet"])
def test_formats_give_the_same_plan(root, suffix):
    csv_plan, csv_warnings = _read(root, GOOD, ".csv")
    plan, warnings = _read(root, GOOD, suffix)
    assert_frame_equal(plan, csv_plan)
    assert warnings == csv_warnings == []


def test_good_rows(root):
    plan, _ = _read(root, GOOD)
    assert plan.schema == pl.from_arrow(QUERY_PLAN_SCHEMA.empty_table()).schema
    assert plan["error"].null_count() == plan.height
    assert plan["query_id"].to_list() == ["t", "i", "q00003", "h"]
    assert plan["row"].to_list() == [0, 1, 2, 3]
    assert plan["mode"].to_list() == ["text", "image", "hybrid", "hybrid"]
    assert plan["top_k"].to_list() == [3, 5, 5, 7]
    assert plan["text"][0] == "red door"
    assert plan["image"][1] == "imgs/a.jpg"
    assert plan["image_path"][1] == os.path.realpath(root / "imgs" / "a.jpg")
    assert plan["where"].to_list() == ["(city = 'Paris') AND (safer >= 4.5)",
                                       "(wealthier <= 7.0)",
                                       "(city = 'x'' OR ''1''=''1')", None]


def test_every_row_error_keeps_the_good_rows(root):
    bad = {
        "none": ({"city": "Paris"}, "row has no text and no image"),
        "mode": ({"text": "a", "mode": "fuzzy"},
                 "unknown mode 'fuzzy'; use text, image, caption or hybrid"),
        "needimg": ({"text": "a", "mode": "image"}, "mode 'image' needs an image"),
        "needtxt": ({"image": "imgs/a.jpg", "mode": "hybrid"}, "mode 'hybrid' needs text"),
        "nan": ({"text": "a", "min_safer": "nan"}, "min_safer must be a finite number, got 'nan'"),
        "inf": ({"text": "a", "max_livelier": "inf"}, "max_livelier must be a finite number"),
        "ninf": ({"text": "a", "min_wealthier": "-Infinity"}, "min_wealthier must be a finite"),
        "junk": ({"text": "a", "max_more_boring": "lots"}, "max_more_boring must be a finite"),
        "f32": ({"text": "a", "min_livelier": "1e39"}, "min_livelier must be a finite number"),
        "minmax": ({"text": "a", "min_safer": "7", "max_safer": "4.5"},
                   "min_safer 7.0 is greater than max_safer 4.5"),
        "url": ({"image": "https://example.com/a.jpg"}, "URLs are not allowed for query images"),
        "file": ({"image": "file:///etc/passwd"}, "URLs are not allowed for query images"),
        "dots": ({"image": "imgs/../secret.jpg"}, "query image imgs/../secret.jpg is outside"),
        "abs": ({"image": str(root / "secret.jpg")},
                f"query image {root / 'secret.jpg'} is outside"),
        "link": ({"image": "imgs/link.jpg"}, "query image imgs/link.jpg is outside the allowed"),
        "gone": ({"image": "imgs/nope.jpg"}, "query image not found: "
                 + os.path.realpath(root / "imgs" / "nope.jpg")),
        "dir": ({"image": "imgs"}, "query image not found"),
        "two": ({"text": "a", "top_k": "0", "min_safer": "x"},
                "top_k must be an integer from 1 to 100, got '0'; min_safer must be"),
    }
    for i, k in enumerate(["1e9", "-3", "2.5", "ten", "101", "9" * 30, "0x10"]):
        bad[f"k{i}"] = ({"text": "a", "top_k": k}, f"top_k must be an integer from 1 to 100, "
                        f"got {k!r}")
    rows = []
    for qid, (row, _) in bad.items():
        rows += [{"query_id": qid, **row}, {"query_id": f"ok-{qid}", "text": "fine"}]
    rows += [{"query_id": "ok-none", "text": "again"}]  # duplicate of a good id
    plan, _ = _read(root, rows)
    errors = _errors(plan)
    for qid, (_, expected) in bad.items():
        assert errors[qid] is not None and errors[qid].startswith(expected), (qid, errors[qid])
        assert errors[f"ok-{qid}"] is None
    assert plan["error"][-1] == "duplicate query_id 'ok-none'"
    failed = plan.filter(pl.col("error").is_not_null())
    assert failed["where"].null_count() == failed.height
    assert failed.filter(pl.col("query_id") == "link")["image_path"][0] is None
    assert failed.filter(pl.col("query_id") == "link")["image"][0] == "imgs/link.jpg"


def test_duplicate_and_generated_ids(root):
    rows = [{"text": "a"}, {"query_id": "q00001", "text": "b"}, {"query_id": " x ", "text": "c"},
            {"query_id": "x", "text": "d"}]
    plan, _ = _read(root, rows)
    assert plan["query_id"].to_list() == ["q00001", "q00001", "x", "x"]
    assert plan["error"].to_list() == [None, "duplicate query_id 'q00001'", None,
                                       "duplicate query_id 'x'"]


def test_malformed_jsonl_lines_are_row_errors(root):
    path = root / "q.jsonl"
    path.write_text('{"text": "a\u2028b"}\r\n\n{"text": "b",\n[1, 2]\n{"text": "c", "top_k": 2}\n',
                    newline="")
    plan, _ = read_queries(str(path), image_roots=[str(root / "imgs")])
    assert plan["row"].to_list() == [0, 1, 2, 3]
    assert plan["query_id"].to_list() == ["q00001", "q00002", "q00003", "q00004"]
    assert plan["error"][0] is None and plan["error"][3] is None
    assert plan["error"][1].startswith("line 3 is not valid JSON")
    assert plan["error"][2] == "line 4 is not a JSON object"
    assert plan["top_k"][3] == 2 and plan["text"][0] == "a\u2028b"


def test_unknown_and_case_insensitive_columns(root):
    path = root / "q.csv"
    path.write_text(" TEXT ,Top_K,colour,Text\nred door,2,blue,ignored\n")
    plan, warnings = read_queries(str(path), image_roots=[])
    assert plan["text"].to_list() == ["red door"] and plan["top_k"].to_list() == [2]
    assert len(warnings) == 2
    assert "unknown columns" in warnings[0] and "'colour'" in warnings[0]
    assert "duplicate columns" in warnings[1]


def test_empty_file_is_an_empty_plan(root):
    (root / "q.csv").write_text("text,image\n")
    plan, warnings = read_queries(str(root / "q.csv"), image_roots=[])
    assert plan.height == 0 and list(plan.columns) == QUERY_PLAN_SCHEMA.names
    assert warnings == [f"no queries in {root / 'q.csv'}"]


@pytest.mark.parametrize("name,content,message", [
    ("missing.csv", None, "queries file not found"),
    ("adir.csv", "DIR", "is a directory"),
    ("q.txt", "text\na\n", "unknown format"),
    ("q.parquet", "PAR1 garbage, not parquet", "cannot parse queries file"),
    ("q.csv", b"text\n\xff\xfe\n", "not valid UTF-8"),
    ("q.csv", 'text,x\na,b,c\n"open', "cannot parse queries file"),
    ("q.json", '[{"text": "a"},', "cannot parse queries file"),
    ("q.jsonl", "not json\nat all\n", "no line is valid JSON"),
])
def test_fatal_errors_are_one_line(tmp_path, name, content, message):
    path = tmp_path / name
    if content == "DIR":
        path.mkdir()
    elif isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    with pytest.raises(QueryFileError) as info:
        read_queries(str(path), image_roots=[])
    text = str(info.value)
    assert message in text and str(path) in text and "\n" not in text


def test_build_where_format_and_refusals():
    assert build_where(None, {}) is None
    assert build_where(None, {"safer": (None, None)}) is None
    assert build_where("O'Brien", {"safer": (4.5, 7), "livelier": (-1, None)}) == (
        "(city = 'O''Brien') AND (livelier >= -1.0) AND (safer >= 4.5) AND (safer <= 7.0)")
    for city, bounds in [("a\x00b", {}), (None, {"safer); DROP": (1.0, None)}),
                         (None, {"safer": (float("nan"), None)}),
                         (None, {"safer": (None, float("inf"))})]:
        with pytest.raises(ValueError):
            build_where(city, bounds)


# --- against real LanceDB -----------------------------------------------------------------

CITIES = ["Paris", HOSTILE, "O'Brien Town", "Paris' OR city <> '", "\\", "a\\'", "%", "",
          "O''Brien Town", "paris"]


@pytest.fixture(scope="module")
def city_table(tmp_path_factory):
    """One small table per module; the property test appends rows and tracks them in ``rows``."""
    rows = [{"id": i, "city": c, "safer": 4.1 + i} for i, c in enumerate(CITIES)]
    db = lancedb.connect(tmp_path_factory.mktemp("lance"))
    schema = pa.schema([("id", pa.int64()), ("city", pa.string()), ("safer", pa.float32())])
    return db.create_table("t", pa.Table.from_pylist(rows, schema=schema)), rows, schema


def _ids(tbl, where: str) -> set[int]:
    return set(tbl.search().where(where).limit(100_000).to_arrow()["id"].to_pylist())


@pytest.mark.parametrize("city", [*CITIES, "' OR 1=1 --", "nowhere' OR '1'='1"])
def test_city_filter_matches_only_the_literal(city_table, city):
    tbl, rows, _ = city_table
    expected = {r["id"] for r in rows if r["city"] == city}
    assert _ids(tbl, build_where(city, {})) == expected
    assert len(expected) <= 1


def test_plan_where_runs_against_lancedb(root, city_table):
    """End to end: a hostile city from a CSV, and float32-exact bounds that keep 4.1 itself."""
    tbl, rows, _ = city_table
    f32 = struct.unpack("f", struct.pack("f", 4.1))[0]
    plan, _ = _read(root, [{"text": "a", "city": HOSTILE}, {"text": "b", "min_safer": "4.1",
                                                             "max_safer": "5.1"}])
    assert _ids(tbl, plan["where"][0]) == {1}
    assert plan["min_safer"][1] == pytest.approx(f32)
    assert _ids(tbl, plan["where"][1]) == {0, 1}


@settings(max_examples=50, deadline=None)
@given(st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=30))
def test_any_city_matches_exactly_its_rows(city_table, city):
    tbl, rows, schema = city_table
    row = {"id": len(rows), "city": city, "safer": 1.0}
    tbl.add(pa.Table.from_pylist([row], schema=schema))
    rows.append(row)
    assert _ids(tbl, build_where(city, {})) == {r["id"] for r in rows if r["city"] == city}


@settings(max_examples=50, deadline=None)
@given(st.lists(st.dictionaries(st.sampled_from([*INPUT_COLUMNS, "Extra"]),
                                st.one_of(st.none(), st.text(max_size=12), st.integers(),
                                          st.floats()), max_size=6), max_size=5))
def test_any_jsonl_gives_a_plan_without_raising(tmp_path_factory, rows):
    path = tmp_path_factory.getbasetemp() / "prop.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) or "\n")
    plan, _ = read_queries(str(path), image_roots=[str(path.parent)])
    assert plan.height == len(rows)
    good = plan.filter(pl.col("error").is_null())
    assert good["mode"].null_count() == 0 and good["top_k"].null_count() == 0
