"""Grounded answers: boxes parsed from the text in each coordinate convention, mapped through the
real grid back to photos and checked against the photo's own coordinates."""

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
    text, boxes = parse_boxes(f"It is here [{coords}].", tiles, SIZE, "padded")
    assert text == "It is here."
    assert len(boxes) == 1 and boxes[0]["image_id"] == f"img{n_tiles}"
    assert boxes[0]["rank"] == n_tiles
    tolerance = 2.5 / (SIZE / (2 if n_tiles > 1 else 1)) * max(shape) / min(shape)
    got = [boxes[0][k] for k in ("x1", "y1", "x2", "y2")]
    assert got == pytest.approx(target, abs=tolerance)


def test_pixel_coordinates_clipping_and_bad_boxes():
    tiles = [Tile(None, None, 100, 100)]  # a query photo alone: the whole picture
    text, boxes = parse_boxes(
        "a [[-10, 0, 168, 350]] b [[0.5, 0.5, 0.5, 0.2]] c [[nan, 1, 2, 3]] d [[1, 2]] "
        "e [[1e999, 0, 5, 5]] f [[0, 0, 84, 84]] g [[-200, 0, 5, 5]] h [[5, 5, 5, 9]]",
        tiles, SIZE, "pixels")
    assert text == "a b c d e f g h"
    assert [b["image_id"] for b in boxes] == [None, None]
    assert [round(boxes[0][k], 6) for k in ("x1", "y1", "x2", "y2")] == \
        [0.0, 0.0, 0.5, 1.0]  # pixels 0..168 of 336 wide, a little over the edge clipped
    assert [boxes[1][k] for k in ("x1", "y1", "x2", "y2")] == [0.0, 0.0, 0.25, 0.25]


def test_box_on_a_missing_tile_is_dropped():
    tiles = [Tile("a", 1, None, None), Tile("b", 2, 50, 50)]
    _, boxes = parse_boxes("[0.1, 0.1, 0.3, 0.3] and [0.6, 0.1, 0.9, 0.4]", tiles, SIZE)
    assert [b["image_id"] for b in boxes] == ["b"]


def test_integer_boxes_are_not_mistaken_for_citations():
    tiles = [Tile("a", 1, 64, 64)]
    row: dict = {}
    result = {"text": "See [1] at [[10, 20, 200, 300]].", "prompt": "p", "n_prompt_tokens": 5,
              "n_generated_tokens": 7, "tiles": '[{"image_id": "a", "rank": 1, "width": 64, '
              '"height": 64}]'}
    _fill(row, result, 3, "pixels")
    assert row["answer"] == "See [1] at." and row["citations"] == [1]
    assert row["raw_answer"].endswith("[[10, 20, 200, 300]].")
    assert parse_citations(row["raw_answer"], 300)[0] != row["citations"]  # why it matters
    assert len(row["boxes"]) == 1 and row["prompt_images"] == ["a"] and tiles[0].rank == 1


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200), st.lists(st.floats(allow_nan=True), min_size=4, max_size=4))
def test_parse_never_raises_and_boxes_are_normalised(prefix, values):
    tiles = [Tile(None, None, 40, 90), Tile("x", 1, 90, 40)]
    text = f"{prefix} [[{', '.join(map(str, values))}]]"
    cleaned, boxes = parse_boxes(text, tiles, SIZE, "pixels")
    assert cleaned.count("[[") <= prefix.count("[[")  # our group is always removed
    for b in boxes:
        coords = [b[k] for k in ("x1", "y1", "x2", "y2")]
        assert all(math.isfinite(c) and 0.0 <= c <= 1.0 for c in coords)
        assert coords[0] < coords[2] and coords[1] < coords[3]


def test_answers_file_carries_boxes_and_old_versions_still_read(tmp_path):
    old = pa.schema([f for f in ANSWER_SCHEMA if f.name not in
                     ("boxes", "raw_answer", "search_options", "n_context_dropped",
                      "prompt_token_budget")],
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


# --- every convention, checked against the photo's own coordinates ----------------------------
#
# Four 200×200 photos in the 336-px 2×2 grid: each fills its 168-px tile.  The target is the
# region (0.25, 0.5)–(0.75, 1.0) of photo "b" (tile 2, top right): grid pixels
# (168 + 42, 84)–(168 + 126, 168) = (210, 84)–(294, 168).

SQUARE = [Tile(name, rank, 200, 200) for rank, name in enumerate("abcd", 1)]
TARGET = (0.25, 0.5, 0.75, 1.0)


def _coords(box: dict) -> list[float]:
    return [box[k] for k in ("x1", "y1", "x2", "y2")]


@pytest.mark.parametrize("convention, text", [
    ("padded", "The bench is at [0.625, 0.25, 0.875, 0.5]."),  # LLaVA-1.5's own form
    ("padded", "The bench is at [[0.625, 0.25, 0.875, 0.5]]."),
    ("per_mille", "The bench is at [[625, 250, 875, 500]]."),
    ("per_mille", "The bench is at [625, 250, 875, 500]."),
    ("pixels", "The bench is at [[210, 84, 294, 168]]."),
    ("pixels", "The bench is at [210, 84, 294, 168]."),
])
def test_each_convention_lands_on_the_photo(convention, text):
    cleaned, boxes = parse_boxes(text, SQUARE, SIZE, convention)
    assert cleaned == "The bench is at."
    assert [(b["image_id"], b["rank"]) for b in boxes] == [("b", 2)]
    assert _coords(boxes[0]) == pytest.approx(TARGET, abs=1e-6)


def test_a_letterboxed_photo_is_measured_in_its_own_frame():
    """A 300×150 photo in tile 3 (bottom left) is fitted to 168×84 at y 210..294: the box
    (84, 210)–(168, 252) is its right half, top half."""
    tiles = [*SQUARE[:2], Tile("wide", 3, 300, 150), SQUARE[3]]
    _, boxes = parse_boxes("[0.25, 0.625, 0.5, 0.75]", tiles, SIZE, "padded")
    assert [b["image_id"] for b in boxes] == ["wide"]
    assert _coords(boxes[0]) == pytest.approx((0.5, 0.0, 1.0, 0.5), abs=1e-6)


def test_a_box_spanning_tiles_goes_to_the_photo_it_overlaps_most():
    """Centre in tile 2 (x 175), but tile 2 holds a thin 300×100 photo (y 56..112) and the box
    covers far more of photo 1: it is photo 1's, clipped to it."""
    tiles = [Tile("a", 1, 200, 200), Tile("thin", 2, 300, 100)]
    _, boxes = parse_boxes("[[60, 0, 290, 168]]", tiles, SIZE, "pixels")
    assert [b["image_id"] for b in boxes] == ["a"]
    assert _coords(boxes[0]) == pytest.approx((60 / 168, 0.0, 1.0, 1.0), abs=1e-6)
    _, boxes = parse_boxes("[[100, 60, 300, 100]]", tiles, SIZE, "pixels")  # mostly on "thin"
    assert [b["image_id"] for b in boxes] == ["thin"]
    assert _coords(boxes[0]) == pytest.approx((0.0, 4 / 56, 132 / 168, 44 / 56), abs=1e-6)


@pytest.mark.parametrize("convention, text, expected", [
    ("padded", "[0.5, 0.5, 1.02, 1.03]", (0.5, 0.5, 1.0, 1.0)),  # a little over: clipped
    ("padded", "[-0.01, 0.2, 0.4, 0.6]", (0.0, 0.2, 0.4, 0.6)),
    ("per_mille", "[[500, 500, 1010, 1000]]", (0.5, 0.5, 1.0, 1.0)),
    ("padded", "[0.8, 0.9, 0.2, 0.1]", (0.2, 0.1, 0.8, 0.9)),  # swapped corners reordered
    ("per_mille", "[[800, 100, 200, 900]]", (0.2, 0.1, 0.8, 0.9)),
    ("pixels", "[[336, 336, 0, 0]]", (0.0, 0.0, 1.0, 1.0)),
])
def test_clipping_and_swapped_corners(convention, text, expected):
    _, boxes = parse_boxes(text, [Tile("p", 1, 500, 500)], SIZE, convention)
    assert len(boxes) == 1 and _coords(boxes[0]) == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("convention, text", [
    ("padded", "[0.5, 0.5, 1.2, 0.9]"),  # 1.2 is no fraction of the image
    ("padded", "[12, 40, 200, 300]"),  # pixels are not fractions
    ("per_mille", "[[0, 0, 1200, 500]]"),
    ("pixels", "[[0, 0, 400, 100]]"),
    ("padded", "[0.3, 0.3, 0.3, 0.6]"),  # empty
])
def test_far_out_of_range_boxes_are_dropped(convention, text):
    cleaned, boxes = parse_boxes(f"here {text}.", [Tile("p", 1, 500, 500)], SIZE, convention)
    assert boxes == [] and cleaned == "here."


@pytest.mark.parametrize("convention", ["padded", "per_mille", "pixels"])
def test_a_bracket_of_four_numbers_is_never_citations(convention):
    row: dict = {}
    tiles = '[{"image_id": "a", "rank": 1, "width": 64, "height": 64}]'
    text = "Safe [1], busy [2, 3]; see [12, 40, 200, 300] and [[1, 2, 3, 4]]."
    _fill(row, {"text": text, "tiles": tiles}, 300, convention)
    assert row["citations"] == [1, 2, 3]
    assert row["answer"] == "Safe [1], busy [2, 3]; see and."
    assert row["raw_answer"] == text
    assert parse_citations(text, 300)[0] == [1, 2, 3, 4, 12, 40, 200, 300]  # the confusion


def test_unknown_convention_is_refused():
    with pytest.raises(ValueError, match="choose one of: padded, per_mille, pixels"):
        parse_boxes("[1, 2, 3, 4]", [Tile("p", 1, 5, 5)], SIZE, "inches")
