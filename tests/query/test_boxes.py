"""Grounded answers: boxes parsed from the text, mapped through the real grid back to photos."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image, ImageDraw

from schemas.answers import ANSWER_SCHEMA
from tasks.io.answers import read_answers, write_answers
from tasks.models.engines import GenRequest, GenResult
from tasks.query.boxes import Tile, parse_boxes
from tasks.query.prompts import build_grid, parse_citations
from tasks.query.run import GRID_SIZE, _fill

SIZE = GRID_SIZE


def _photo(w: int, h: int, box: tuple[float, float, float, float]) -> Image.Image:
    """A grey photo with a pure red rectangle at ``box`` (fractions of the photo)."""
    im = Image.new("RGB", (w, h), (90, 90, 90))
    x1, y1, x2, y2 = box
    ImageDraw.Draw(im).rectangle((x1 * w, y1 * h, x2 * w - 1, y2 * h - 1), fill=(255, 0, 0))
    return im


def _red_box(grid: Image.Image) -> list[float]:
    """The red rectangle's extent in the grid, as the model would report it (fractions)."""
    a = np.asarray(grid).astype(int)
    red = (a[..., 0] > 200) & (a[..., 1] < 60) & (a[..., 2] < 60)
    ys, xs = np.nonzero(red)
    return [xs.min() / SIZE, ys.min() / SIZE, (xs.max() + 1) / SIZE, (ys.max() + 1) / SIZE]


@pytest.mark.parametrize("n_tiles", [1, 2, 4])
@pytest.mark.parametrize("shape", [(336, 224), (200, 300), (256, 256)])
def test_box_drawn_in_the_grid_maps_back_to_its_photo(n_tiles, shape):
    target = (0.2, 0.3, 0.6, 0.8)
    photos = [_photo(*shape, target) if i == n_tiles - 1 else Image.new("RGB", shape, (0, 90, 0))
              for i in range(n_tiles)]
    grid = build_grid(photos, [str(i + 1) for i in range(n_tiles)], SIZE)
    tiles = [Tile(f"img{i + 1}", i + 1, *p.size) for i, p in enumerate(photos)]
    coords = ", ".join(f"{v:.4f}" for v in _red_box(grid))
    text, boxes = parse_boxes(f"It is here [[{coords}]].", tiles, SIZE)
    assert text == "It is here."
    assert len(boxes) == 1 and boxes[0]["image_id"] == f"img{n_tiles}"
    assert boxes[0]["rank"] == n_tiles
    tolerance = 2.5 / (SIZE / (2 if n_tiles > 1 else 1)) * max(shape) / min(shape)
    got = [boxes[0][k] for k in ("x1", "y1", "x2", "y2")]
    assert got == pytest.approx(target, abs=tolerance)


def test_pixel_coordinates_clipping_and_bad_boxes():
    tiles = [Tile(None, None, 100, 100)]  # a query photo alone: the whole picture
    text, boxes = parse_boxes(
        "a [[-20, 0, 168, 400]] b [[0.5, 0.5, 0.2, 0.9]] c [[nan, 1, 2, 3]] d [[1, 2]] "
        "e [[1e999, 0, 5, 5]] f [[0, 0, 0.5, 0.5]]", tiles, SIZE)
    assert text == "a b c d e f"
    assert [b["image_id"] for b in boxes] == [None, None]
    assert [round(b[k], 6) for k in ("x1", "y1", "x2", "y2") for b in boxes[:1]] == \
        [0.0, 0.0, 0.5, 1.0]  # pixels 0..168 of 336 wide, y clipped to the photo
    assert [boxes[1][k] for k in ("x1", "y1", "x2", "y2")] == [0.0, 0.0, 0.5, 0.5]


def test_box_on_a_missing_tile_is_dropped():
    tiles = [Tile("a", 1, None, None), Tile("b", 2, 50, 50)]
    _, boxes = parse_boxes("[[0.1, 0.1, 0.3, 0.3]] and [[0.6, 0.1, 0.9, 0.4]]", tiles, SIZE)
    assert [b["image_id"] for b in boxes] == ["b"]


def test_integer_boxes_are_not_mistaken_for_citations():
    tiles = [Tile("a", 1, 64, 64)]
    req = GenRequest("p")
    row: dict = {}
    _fill(row, req, tiles, GenResult("See [1] at [[10, 20, 200, 300]].", None, 5, 7), 3)
    assert row["answer"] == "See [1] at." and row["citations"] == [1]
    assert row["raw_answer"].endswith("[[10, 20, 200, 300]].")
    assert parse_citations(row["raw_answer"], 300)[0] != row["citations"]  # why it matters
    assert len(row["boxes"]) == 1 and row["prompt_images"] == ["a"]


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200), st.lists(st.floats(allow_nan=True), min_size=4, max_size=4))
def test_parse_never_raises_and_boxes_are_normalised(prefix, values):
    tiles = [Tile(None, None, 40, 90), Tile("x", 1, 90, 40)]
    text = f"{prefix} [[{', '.join(map(str, values))}]]"
    cleaned, boxes = parse_boxes(text, tiles, SIZE)
    assert cleaned.count("[[") <= prefix.count("[[")  # our group is always removed
    for b in boxes:
        coords = [b[k] for k in ("x1", "y1", "x2", "y2")]
        assert all(math.isfinite(c) and 0.0 <= c <= 1.0 for c in coords)
        assert coords[0] < coords[2] and coords[1] < coords[3]


def test_answers_file_carries_boxes_and_old_versions_still_read(tmp_path):
    old = pa.schema([f for f in ANSWER_SCHEMA if f.name not in
                     ("boxes", "raw_answer", "search_options")],
                    metadata={"mmrag.schema_version": "1"})
    part = tmp_path / "answers" / "run_date=2026-01-01"
    part.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist([{"run_id": "v1", "query_id": "q1", "answer": "old"}],
                                        schema=old), part / "v1.parquet")
    box = {"image_id": "a", "rank": 1, "x1": 0.1, "y1": 0.2, "x2": 0.3, "y2": 0.4}
    write_answers([{"run_id": "v2", "query_id": "q1", "answer": "new", "boxes": [box]}],
                  str(tmp_path), "2026-01-02", "v2")
    df = read_answers(str(tmp_path)).sort("run_date").collect()
    assert df["answer"].to_list() == ["old", "new"]
    assert df["boxes"][0] is None
    (got,) = df["boxes"][1].to_list()
    assert got["image_id"] == "a" and got["rank"] == 1
    assert [got[k] for k in ("x1", "y1", "x2", "y2")] == pytest.approx([0.1, 0.2, 0.3, 0.4])
