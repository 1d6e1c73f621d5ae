"""Metadata parsing and path confinement, including property-based checks."""

from __future__ import annotations

import json
import posixpath

import polars as pl
import pytest
from hypothesis import given
from hypothesis import strategies as st

from schemas.metadata import FILE_NAME_PATTERN
from tasks.ingest.metadata import parse_metadata, safe_rel_path
from tasks.ingest.plan import with_metadata

URI = "/dump/metadata.json"


def _parse(records) -> tuple[pl.DataFrame, list[dict]]:
    m = parse_metadata(json.dumps(records).encode(), "json", URI)
    return m.frame, m.rejects


@pytest.mark.parametrize("raw", ["..\\..\\etc\\passwd", "/etc/passwd", "C:\\Windows\\win.ini",
                                 "%2e%2e/%2e%2e/etc/passwd", "a/../../b.jpg", "s3://b/k.jpg",
                                 "", "a\x00b.jpg", "..%2f..%2fetc"])
def test_escaping_paths_are_refused(raw):
    with pytest.raises(ValueError):
        safe_rel_path(raw)


def test_windows_separators_are_normalised():
    assert safe_rel_path("images\\New York\\a.JPG") == "images/New York/a.JPG"
    assert safe_rel_path("./images//x/./a.jpg") == "images/x/a.jpg"


@given(st.text(max_size=60))
def test_safe_paths_never_escape(raw):
    try:
        rel = safe_rel_path(raw)
    except ValueError:
        return
    joined = posixpath.normpath(posixpath.join("/root/dump", rel))
    assert joined.startswith("/root/dump/")


@given(st.lists(st.one_of(st.none(), st.integers(), st.text(max_size=8),
                          st.dictionaries(st.text(max_size=12),
                                          st.one_of(st.none(), st.text(max_size=10),
                                                    st.floats(), st.lists(st.text(max_size=5)))),
                          ), max_size=8))
def test_any_json_list_parses_without_raising(records):
    frame, rejects = _parse(records)
    assert frame.height + len({r["source_uri"] for r in rejects}) >= 0
    assert frame["rel_path"].null_count() == 0
    for c in ("safer", "livelier"):
        assert frame[c].is_nan().sum() == 0 and frame[c].is_infinite().sum() == 0


def test_scores_parse_and_bad_values_become_null_with_a_note():
    frame, rejects = _parse([{"Image Name": "a.jpg", "Relative Path": "a.jpg", "safer": "4.5",
                              "livelier": "abc", "more beautiful": "NaN", "wealthier": "-inf",
                              "more boring": "", "Caption": ["x", "y"]}])
    row = frame.row(0, named=True)
    assert row["safer"] == pytest.approx(4.5) and row["caption"] == "x\ny"
    assert row["livelier"] is None and row["more_beautiful"] is None
    assert row["wealthier"] is None and row["more_boring"] is None
    assert sorted(r["error"].split(" ")[0] for r in rejects) == ["livelier", "more_beautiful",
                                                                 "wealthier"]


@pytest.mark.parametrize("data, fmt, reason", [
    (b"[{", "json", "JSONDecodeError"),
    (b'{"Image Name": "a.jpg"}', "json", "expected a JSON list"),
    (b"\x00\x01 not parquet", "parquet", "cannot parse"),
])
def test_broken_files_are_one_reject(data, fmt, reason):
    m = parse_metadata(data, fmt, URI)
    assert m.frame.height == 0
    assert [r["stage"] for r in m.rejects] == ["metadata"] and reason in m.rejects[0]["error"]


def test_duplicates_rows_and_non_objects():
    frame, rejects = _parse([{"Relative Path": "a.jpg", "safer": "1"}, 7,
                             {"Relative Path": "a.jpg", "safer": "2"}, {"foo": 1}])
    assert frame.height == 1 and frame["safer"][0] == 1.0
    errors = " | ".join(r["error"] for r in rejects)
    assert "not an object" in errors and "duplicate" in errors and "neither" in errors


def test_csv_and_parquet_carry_the_same_columns(tmp_path):
    df = pl.DataFrame({"Image Name": ["a.jpg"], "Relative Path": ["x\\a.jpg"],
                       "Caption": ["hello"], "safer": ["3.5"], "City": ["Paris"]})
    for fmt, data in (("csv", df.write_csv().encode()), ("parquet", _parquet(df, tmp_path))):
        m = parse_metadata(data, fmt, URI)
        assert m.frame.select("rel_path", "city", "caption").row(0) == ("x/a.jpg", "Paris",
                                                                        "hello"), fmt
        assert m.frame["safer"][0] == 3.5


def _parquet(df, tmp_path) -> bytes:
    df.write_parquet(tmp_path / "m.parquet")
    return (tmp_path / "m.parquet").read_bytes()


def test_file_name_fallback_and_missing_rows():
    listing = pl.DataFrame({"source_uri": ["/d/x/40.7_-74.0_abc123_New York.JPG", "/d/x/b.jpg"],
                            "rel_path": ["x/40.7_-74.0_abc123_New York.JPG", "x/b.jpg"],
                            "file_name": ["40.7_-74.0_abc123_New York.JPG", "b.jpg"]})
    m = parse_metadata(json.dumps([{"Relative Path": "x\\b.jpg", "City": "Lyon"},
                                   {"Relative Path": "x\\gone.jpg"}]).encode(), "json", URI)
    joined, missing = with_metadata(listing, m, "/d")
    rows = {r["file_name"]: r for r in joined.iter_rows(named=True)}
    pp = rows["40.7_-74.0_abc123_New York.JPG"]
    assert (pp["city"], pp["lat"], pp["lon"], pp["place_id"]) == ("New York", 40.7, -74.0,
                                                                  "abc123")
    assert rows["b.jpg"]["city"] == "Lyon" and rows["b.jpg"]["lat"] is None
    assert [(r["source_uri"], r["stage"]) for r in missing] == [("/d/x/gone.jpg", "missing")]


@given(st.floats(-90, 90, allow_nan=False), st.floats(-180, 180, allow_nan=False),
       st.from_regex(r"[0-9a-f]{24}", fullmatch=True),
       st.from_regex(r"[A-Z][a-z]{1,10}( [A-Z][a-z]{1,8})?", fullmatch=True))
def test_place_pulse_names_round_trip(lat, lon, pid, city):
    name = f"{lat:.6f}_{lon:.6f}_{pid}_{city}.JPG"
    m = FILE_NAME_PATTERN.match(name)
    assert m and m["city"] == city and m["place_id"] == pid
    assert float(m["lat"]) == pytest.approx(lat, abs=1e-6)


def test_oversized_metadata_file_is_a_reject_not_a_crash(tmp_path, monkeypatch):
    from pyarrow import fs as pafs

    import tasks.ingest.metadata as metadata

    good = [{"Relative Path": "a.jpg", "City": "Paris"}]
    (tmp_path / "metadata.json").write_text(json.dumps(good))
    local = pafs.LocalFileSystem()
    assert metadata.load_metadata(local, str(tmp_path)).frame.height == 1
    monkeypatch.setattr(metadata, "MAX_METADATA_BYTES", 10)
    meta = metadata.load_metadata(local, str(tmp_path))
    assert meta.frame.height == 0
    (reject,) = meta.rejects
    assert reject["stage"] == "metadata" and "over the 10-byte limit" in reject["error"]
