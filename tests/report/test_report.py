"""``mmrag report``: HTML built from hand-made answers and a LanceDB written row by row (no Ray,
no models), checked as a user sees it in Debian's headless Chromium."""

from __future__ import annotations

import base64
import io
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from report_fixtures import HOSTILE, build_db, run_rows, write_v1

from tasks.io.answers import write_answers
from tasks.report.boxes import boxes_by_target
from tasks.report.images import Thumbnailer, ledger_roots
from tasks.report.overview import build_overview
from tasks.report.run import RunNotFound, answer_html, build_run_report

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]
VIEWPORT = {"width": 1280, "height": 900}
BOX_RGB = (255, 45, 85)  # .box border colour in report_templates.CSS


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    from mmrag.samples.dump import generate_sample_dump

    root = tmp_path_factory.mktemp("report")
    dump = root / "dump"
    generate_sample_dump(dump, 12, seed=3, size=(320, 240))
    rows = build_db(dump, root / "db", root / "outside")
    answers = run_rows(rows["images"], rows["images"][9]["source_uri"])
    write_answers(answers, str(root / "out"), "2026-11-30", "r1")
    write_v1(answers, root / "out", "2026-11-29", "old")
    return {"root": root, "dump": dump, "db": str(root / "db"), "out": str(root / "out"),
            "rows": rows, "answers": answers}


@pytest.fixture(scope="module")
def reports(inputs):
    paths = {}
    for name, (html, summary) in {
        "r1": build_run_report(inputs["out"], "r1", db=inputs["db"]),
        "old": build_run_report(inputs["out"], "old", db=inputs["db"]),
        "overview": build_overview(inputs["db"]),
    }.items():
        paths[name] = inputs["root"] / f"{name}.html"
        paths[name].write_text(html)
        paths[name + "_summary"] = summary
    return paths


@pytest.fixture(scope="module")
def browser():
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} not installed (apt-get install chromium; .ci/run does)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


def _open(browser, path: Path):
    """A page with every console error, page error, dialog and request recorded."""
    page = browser.new_page(viewport=VIEWPORT)
    seen = {"errors": [], "dialogs": [], "requests": []}
    page.on("console", lambda m: m.type == "error" and seen["errors"].append(m.text))
    page.on("pageerror", lambda e: seen["errors"].append(str(e)))
    page.on("dialog", lambda d: (seen["dialogs"].append(d.message), d.dismiss()))
    page.on("request", lambda r: seen["requests"].append(r.url))
    page.goto(path.as_uri(), wait_until="load")
    return page, seen


def _images_loaded(page) -> list[dict]:
    return page.evaluate("""() => [...document.images].map(i => ({
        ok: i.complete && i.naturalWidth > 0, alt: i.alt}))""")


def _offline(seen: dict, path: Path) -> None:
    assert seen["errors"] == [] and seen["dialogs"] == []
    assert all(u == path.as_uri() or u.startswith("data:") for u in seen["requests"])


# ------------------------------------------------------------------ pure functions
def test_boxes_go_to_the_hit_of_their_rank_or_the_query_image():
    hits = [{"rank": 1, "image_id": "a"}, {"rank": 2, "image_id": "b"}]
    boxes = [
        {"image_id": "a", "rank": 1, "x1": 0.1, "y1": 0.2, "x2": 0.5, "y2": 0.6},
        {"image_id": None, "rank": 2, "x1": -0.5, "y1": 0.5, "x2": 1.5, "y2": 0.75},  # clamped
        {"image_id": None, "rank": None, "x1": 0.0, "y1": 0.0, "x2": 1.0, "y2": 1.0},  # query
        {"image_id": "b", "rank": 1, "x1": 0.1, "y1": 0.1, "x2": 0.2, "y2": 0.2},  # id ≠ rank 1
        {"image_id": "a", "rank": None, "x1": 0.1, "y1": 0.1, "x2": 0.2, "y2": 0.2},  # no rank
        {"image_id": None, "rank": 7, "x1": 0.1, "y1": 0.1, "x2": 0.2, "y2": 0.2},  # no hit 7
        {"image_id": None, "rank": 2, "x1": 0.6, "y1": 0.1, "x2": 0.2, "y2": 0.2},  # inverted
        {"image_id": None, "rank": 2, "x1": math.nan, "y1": 0.1, "x2": 0.2, "y2": 0.2},
    ]
    out, unmatched = boxes_by_target(boxes, hits)
    assert unmatched == 5
    assert [(b["left"], b["top"], b["width"], b["height"]) for b in out[1]] == [(10, 20, 40, 40)]
    assert [(b["left"], b["top"], b["width"], b["height"]) for b in out[2]] == [(0, 50, 100, 25)]
    assert [(b["left"], b["width"]) for b in out[None]] == [(0, 100)]
    assert boxes_by_target(None, hits) == ({}, 0)


def test_answer_is_escaped_and_only_retrieved_ranks_are_linked():
    html = str(answer_html(f"{HOSTILE} [1] [2, 9]", 4, {1, 2}))
    assert "<script" not in html and "<img" not in html and "&lt;script&gt;" in html
    assert html.count('class="cite"') == 2 and 'href="#q4-hit9"' not in html


def test_thumbnails_come_only_from_trusted_roots_and_matching_bytes(inputs, tmp_path):
    dump, image = inputs["dump"], inputs["rows"]["images"][0]
    thumbs = Thumbnailer([str(dump)])
    good = thumbs.thumb(image["source_uri"], image["image_id"])
    assert good.uri.startswith("data:image/jpeg;base64,")
    assert (good.width, good.height) == (160, 120)  # 320×240 fitted in 160 px, aspect kept
    with Image.open(io.BytesIO(base64.b64decode(good.uri.split(",", 1)[1]))) as im:
        assert im.size == (160, 120)
    assert thumbs.thumb(image["rel_path"]).uri  # relative: resolved under the root
    assert thumbs.thumb(image["source_uri"], "0" * 64).reason.startswith("file changed")
    outside = tmp_path / "elsewhere.jpg"
    shutil.copyfile(image["source_uri"], outside)
    for path in (str(outside), str(dump / "images/bad/link.jpg"), f"{dump}/../{outside.name}",
                 "/etc/passwd", None):
        assert thumbs.thumb(path).uri is None
    assert "truncated" in thumbs.thumb(str(dump / "images/bad/truncated.jpg")).reason


def test_ledger_gives_the_dump_root(inputs):
    import lancedb

    files = lancedb.connect(inputs["db"]).open_table("files").to_polars()
    assert ledger_roots(files) == [str(inputs["dump"])]


def test_unknown_or_invalid_run_is_refused(inputs):
    with pytest.raises(RunNotFound):
        build_run_report(inputs["out"], "nope")
    with pytest.raises(ValueError):
        build_run_report(inputs["out"], "../r1")


def test_run_summary_counts(reports, inputs):
    html = reports["r1"].read_text()
    answers = inputs["answers"]
    answered = sum(1 for a in answers if (a.get("answer") or "").strip())
    assert f"<td>answered</td><td>{answered}</td>" in html
    assert "<td>errors by stage</td><td>query=1</td>" in html
    from schemas.answers import SCHEMA_VERSION

    assert f"<td>schema version</td><td>{SCHEMA_VERSION}</td>" in html
    assert "3 drawn, 2 not drawn (no such image or no thumbnail)" in html
    old = reports["old"].read_text()
    assert "<td>schema version</td><td>1</td>" in old
    assert "none (file has no boxes column)" in old and 'class="box"' not in old


# ------------------------------------------------------------------ in the browser
def test_run_report_renders_offline_with_boxes_in_place(browser, reports, inputs, tmp_path):
    page, seen = _open(browser, reports["r1"])
    imgs = _images_loaded(page)
    hits = [h for a in inputs["answers"] for h in a.get("retrieved") or []]
    expected = 2 + 1 + sum(1 for h in hits if h["image_id"] != "0" * 64)  # plots + query img
    assert len(imgs) == expected and all(i["ok"] for i in imgs), imgs
    _offline(seen, reports["r1"])
    assert page.evaluate("document.scripts.length") == 0
    assert page.locator("#q4 .question").text_content() == HOSTILE
    assert "hash differs" in page.locator("#q4-hit3 .missing").text_content()
    assert page.locator("#q4 .box").count() == 0
    q1_boxes = inputs["answers"][0]["boxes"]
    for sel, box in (("#q1-hit1", q1_boxes[0]), ("#q1-hit3", q1_boxes[1]),
                     ("#q2 .top", inputs["answers"][1]["boxes"][0])):
        img = page.locator(f"{sel} .frame img").bounding_box()
        el = page.locator(f"{sel} .box").bounding_box()
        assert img["width"] > 100
        for got, want in ((el["x"], img["x"] + box["x1"] * img["width"]),
                          (el["y"], img["y"] + box["y1"] * img["height"]),
                          (el["width"], (box["x2"] - box["x1"]) * img["width"]),
                          (el["height"], (box["y2"] - box["y1"]) * img["height"])):
            assert abs(got - want) <= 1.5, (sel, got, want)
    _box_painted(page, box=q1_boxes[0], tmp_path=tmp_path)
    _screenshot_not_blank(page, tmp_path / "run.png")
    page.close()


def _box_painted(page, box: dict, tmp_path: Path) -> None:
    """The box's left edge, halfway down, is drawn in the box colour in the real pixels."""
    png = tmp_path / "frame.png"
    page.locator("#q1-hit1 .frame").screenshot(path=str(png))
    with Image.open(png) as im:
        rgb = np.asarray(im.convert("RGB"), dtype=int)
    y = int((box["y1"] + box["y2"]) / 2 * rgb.shape[0])
    x = round(box["x1"] * rgb.shape[1]) + 1  # inside the 2-px border
    assert np.abs(rgb[y, x] - BOX_RGB).max() < 40, rgb[y, x - 2 : x + 3]


def _screenshot_not_blank(page, path: Path) -> None:
    page.screenshot(path=str(path))
    with Image.open(path) as im:
        assert im.size == (VIEWPORT["width"], VIEWPORT["height"])
        grey = np.asarray(im.convert("L"), dtype=float)
    assert grey.std() > 20, grey.std()


def test_overview_renders_rejects_with_examples(browser, reports, inputs, tmp_path):
    page, seen = _open(browser, reports["overview"])
    imgs = _images_loaded(page)
    assert len(imgs) == 3 and all(i["ok"] for i in imgs), imgs  # 2 plots + 1 decodable reject
    _offline(seen, reports["overview"])
    rejects = inputs["rows"]["rejects"]
    for stage in {r["stage"] for r in rejects}:
        n = sum(1 for r in rejects if r["stage"] == stage)
        assert page.locator(f"#stage-{stage} h3").text_content().startswith(f"{stage}: {n} ")
    assert page.locator("#stage-metadata img").count() == 1
    assert page.locator("#stage-path img").count() == 0  # the symlink leaves the dump: not read
    assert HOSTILE in page.locator("#stage-metadata .error").text_content()
    summary = reports["overview_summary"]
    assert summary["images"] == len(inputs["rows"]["images"])
    assert summary["cities"] == len({i["city"] for i in inputs["rows"]["images"]})
    _screenshot_not_blank(page, tmp_path / "overview.png")
    page.close()


# ------------------------------------------------------------------ command line
def test_cli_writes_both_reports(inputs, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from mmrag.cli import app

    monkeypatch.setenv("MMRAG_OUT", str(tmp_path / "elsewhere"))  # --out wins
    r = CliRunner().invoke(app, ["--db", inputs["db"], "report", "r1", "--overview",
                                 "--out", inputs["out"], "--out-dir", str(tmp_path)])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "r1.html").stat().st_size > 10_000
    assert (tmp_path / "images-overview.html").exists()
    assert "run r1: 4 queries (4 shown)" in r.output and "rejects: decode=1" in r.output
    assert CliRunner().invoke(app, ["report"]).exit_code == 2
    missing = CliRunner().invoke(app, ["report", "nope", "--out", inputs["out"]])
    assert missing.exit_code == 2 and "no answers for run 'nope'" in missing.output
