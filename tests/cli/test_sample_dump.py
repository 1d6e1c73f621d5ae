"""The synthetic Place Pulse dump is the ground truth for every ingest and benchmark test, so its
layout, determinism and hostile inputs are checked here against what the files really contain."""

from __future__ import annotations

import hashlib
import json
import math
import re
import struct
from pathlib import Path

import pytest
from PIL import Image, ImageOps, UnidentifiedImageError

from mmrag.samples.dump import CITIES, PERCEPTIONS, generate_sample_dump, write_bad_inputs

NAME_RE = re.compile(r"^(-?\d+\.\d+)_(-?\d+\.\d+)_([0-9a-f]{24})_(.+)\.JPG$")
N = 12
FILE_KINDS = {
    "truncated", "empty", "not_image", "wrong_extension", "bomb", "animated", "cmyk",
    "sixteen_bit", "palette_alpha", "exif_rotated", "one_pixel", "panorama", "symlink_outside",
    "duplicate", "bad_scores", "unreadable", "long_caption",
}  # fmt: skip
ROW_KINDS = {"escape_path", "absolute_path", "drive_letter", "url_encoded", "missing"}


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def dump(tmp_path_factory) -> tuple[Path, list[dict]]:
    root = tmp_path_factory.mktemp("dump")
    return root, generate_sample_dump(root, N, seed=3)


@pytest.fixture(scope="module")
def bad(tmp_path_factory):
    """A dump plus hostile inputs, written twice to prove a re-run replaces rather than appends."""
    root, outside = tmp_path_factory.mktemp("baddump"), tmp_path_factory.mktemp("outside")
    generate_sample_dump(root, 3, seed=5)
    first = write_bad_inputs(root, outside)
    n_rows = len(json.loads((root / "metadata.json").read_text()))
    out = write_bad_inputs(root, outside)
    rows = json.loads((root / "metadata.json").read_text())
    assert out == first and len(rows) == n_rows
    return root, outside, out, {r["Relative Path"]: r for r in rows}


def test_same_seed_gives_identical_bytes(tmp_path):
    a = generate_sample_dump(tmp_path / "a", 4, seed=7)
    b = generate_sample_dump(tmp_path / "b", 4, seed=7)
    assert a == b
    fa, fb = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert len(fa) == 5 and fa == fb  # 4 images + metadata.json


def test_different_seed_gives_different_dump(tmp_path):
    generate_sample_dump(tmp_path / "a", 4, seed=7)
    generate_sample_dump(tmp_path / "b", 4, seed=8)
    fa, fb = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert set(fa) & set(fb) == {"metadata.json"} and fa["metadata.json"] != fb["metadata.json"]
    assert not set(fa.values()) & set(fb.values())


def test_metadata_json_matches_files(dump):
    root, records = dump
    rows = json.loads((root / "metadata.json").read_text())
    assert isinstance(rows, list) and rows == records and len(rows) == N
    for row in rows:
        assert set(row) == {"Image Name", "Relative Path", "Caption", *PERCEPTIONS}
        m = NAME_RE.match(row["Image Name"])
        assert m, row["Image Name"]
        lat, lon, _, city = float(m[1]), float(m[2]), m[3], m[4]
        assert city in CITIES and math.dist((lat, lon), CITIES[city]) < 0.5
        assert row["Relative Path"] == f"images\\{city}\\{row['Image Name']}"
        assert (root / row["Relative Path"].replace("\\", "/")).is_file()
        assert 1 <= len(row["Caption"]) <= 3 and all(isinstance(c, str) for c in row["Caption"])
        assert row["Caption"][0].endswith(f"in {city}")
        for k in PERCEPTIONS:
            assert isinstance(row[k], str) and 0.0 <= float(row[k]) <= 10.0
    assert len({r["Image Name"].split("_")[2] for r in rows}) == N  # place ids unique


def test_images_are_distinct_rgb_jpegs_of_photo_size(dump):
    root, records = dump
    paths = [root / r["Relative Path"].replace("\\", "/") for r in records]
    for p in paths:
        with Image.open(p) as im:
            assert (im.format, im.mode, im.size) == ("JPEG", "RGB", (640, 480))
    assert len({_sha(p) for p in paths}) == N
    sizes = [p.stat().st_size for p in paths]
    assert 20_000 < sum(sizes) / N < 120_000  # like a real street photo, not a flat cartoon


def test_size_quality_and_no_metadata(tmp_path):
    recs = generate_sample_dump(tmp_path, 3, seed=1, size=(96, 64), metadata=False, quality=40)
    assert len(recs) == 3 and not (tmp_path / "metadata.json").exists()
    for r in recs:
        with Image.open(tmp_path / r["Relative Path"].replace("\\", "/")) as im:
            assert im.size == (96, 64)
    assert generate_sample_dump(tmp_path / "empty", 0) == []
    with pytest.raises(ValueError):
        generate_sample_dump(tmp_path, -1)


def test_scores_follow_what_captions_describe(tmp_path):
    recs = generate_sample_dump(tmp_path, 150, seed=11, size=(48, 32))

    def mean(key: str, *words: str) -> float:
        vals = [float(r[key]) for r in recs if any(w in c for c in r["Caption"] for w in words)]
        assert len(vals) >= 5, words
        return sum(vals) / len(vals)

    assert mean("more beautiful", "leafy green") > mean("more beautiful", "treeless") + 1.5
    assert mean("safer", "leafy green") > mean("safer", "treeless") + 1.0
    assert mean("livelier", "busy traffic") > mean("livelier", "no cars") + 1.5
    grey = mean("more depressing", "drab grey", "muted")
    assert grey > mean("more depressing", "colourful") + 1.0


def test_bad_inputs_all_kinds_present(bad):
    root, _, out, rows = bad
    assert set(out) == FILE_KINDS | ROW_KINDS
    for kind in FILE_KINDS:
        path = root / out[kind]
        assert path.parent == root / "images" / "bad" and (path.exists() or path.is_symlink())
        assert out[kind].replace("/", "\\") in rows, kind
    for kind in FILE_KINDS - {"duplicate", "bad_scores"}:
        assert not NAME_RE.match(Path(out[kind]).name)


def test_bad_undecodable_files(bad):
    root, _, out, _ = bad
    with Image.open(root / out["truncated"]) as im, pytest.raises(OSError, match="truncated"):
        im.load()
    assert (root / out["empty"]).stat().st_size == 0
    for kind in ("empty", "not_image"):
        with pytest.raises(UnidentifiedImageError):
            Image.open(root / out[kind])


def test_bad_wrong_extension_is_a_good_png(bad):
    root, _, out, _ = bad
    assert out["wrong_extension"].endswith(".jpg")
    with Image.open(root / out["wrong_extension"]) as im:
        im.load()
        assert (im.format, im.size) == ("PNG", (640, 480))


def test_bad_bomb_claims_huge_dims_in_a_small_file(bad):
    root, _, out, _ = bad
    data = (root / out["bomb"]).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    w, h = struct.unpack(">II", data[16:24])
    assert w * h > 100_000_000 and len(data) < 1_000_000
    with pytest.raises(Image.DecompressionBombError):
        Image.open(root / out["bomb"])


def test_bad_unusual_modes(bad):
    root, _, out, _ = bad
    with Image.open(root / out["animated"]) as im:
        assert im.is_animated and im.n_frames == 3
    with Image.open(root / out["cmyk"]) as im:
        assert (im.format, im.mode) == ("JPEG", "CMYK")
    with Image.open(root / out["sixteen_bit"]) as im:
        assert im.mode == "I;16"
    with Image.open(root / out["palette_alpha"]) as im:
        assert im.mode == "P" and "transparency" in im.info


def test_bad_geometry(bad):
    root, _, out, _ = bad
    with Image.open(root / out["exif_rotated"]) as im:
        assert im.size == (640, 480) and im.getexif()[0x0112] == 6
        assert ImageOps.exif_transpose(im).size == (480, 640)
    with Image.open(root / out["one_pixel"]) as im:
        assert im.size == (1, 1)
    with Image.open(root / out["panorama"]) as im:
        assert (im.format, im.size) == ("JPEG", (10000, 400))


def test_bad_symlink_points_outside_root(bad):
    root, outside, out, _ = bad
    link = root / out["symlink_outside"]
    target = link.resolve()
    assert link.is_symlink() and not target.is_relative_to(root.resolve())
    assert target.is_relative_to(outside.resolve())
    with Image.open(link) as im:
        im.load()


def test_bad_duplicate_is_byte_identical_to_a_dump_image(bad):
    root, _, out, _ = bad
    dup = root / out["duplicate"]
    originals = {_sha(p) for p in (root / "images").rglob("*.JPG") if p.parent.name != "bad"}
    assert NAME_RE.match(dup.name) and _sha(dup) in originals


def test_bad_rows(bad):
    root, _, out, rows = bad
    scores = rows[out["bad_scores"].replace("/", "\\")]
    assert NAME_RE.match(scores["Image Name"])
    assert [scores.get(k) for k in PERCEPTIONS[:4]] == ["abc", "NaN", "inf", ""]
    assert "safer" not in scores
    assert len(rows[out["long_caption"].replace("/", "\\")]["Caption"][0]) == 100_000
    for kind, rel in [("escape_path", "..\\..\\etc\\passwd"), ("absolute_path", "/etc/passwd"),
                      ("drive_letter", "C:\\Windows\\win.ini"),
                      ("url_encoded", "%2e%2e/%2e%2e/etc/passwd")]:  # fmt: skip
        assert out[kind] == rel and rel in rows
    assert out["missing"] in rows
    assert not (root / out["missing"].replace("\\", "/")).exists()
    assert (root / out["unreadable"]).stat().st_mode & 0o777 == 0


def test_bad_inputs_need_an_existing_dump(tmp_path):
    with pytest.raises(FileNotFoundError):
        write_bad_inputs(tmp_path, tmp_path / "outside")
