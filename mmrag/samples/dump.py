"""Synthetic Place Pulse 2.0-style dumps: photo-like street scenes, metadata.json, hostile inputs.

Real Place Pulse images cannot be shipped, so benchmarks and tests need a stand-in with the same
on-disk layout, realistic JPEG sizes, captions worth full-text searching and perception scores that
correlate with what is in the picture.  Everything derives from one seed, so dumps are reproducible
byte for byte, and every scene is drawn with whole-array numpy operations so thousands of images
can be made in a minute.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageChops

PERCEPTIONS = ("livelier", "more beautiful", "more boring", "more depressing", "safer", "wealthier")
CITIES: dict[str, tuple[float, float]] = {
    "Amsterdam": (52.37, 4.90), "Atlanta": (33.75, -84.39), "Bangkok": (13.76, 100.50),
    "Barcelona": (41.39, 2.17), "Berlin": (52.52, 13.40), "Boston": (42.36, -71.06),
    "Bucharest": (44.43, 26.10), "Cape Town": (-33.92, 18.42), "Chicago": (41.88, -87.63),
    "Copenhagen": (55.68, 12.57), "Hong Kong": (22.32, 114.17), "Kyoto": (35.01, 135.77),
    "Lisbon": (38.72, -9.14), "London": (51.51, -0.13), "Madrid": (40.42, -3.70),
    "Mexico City": (19.43, -99.13), "Moscow": (55.76, 37.62), "New York": (40.71, -74.01),
    "Paris": (48.86, 2.35), "Rio De Janeiro": (-22.91, -43.17), "Sao Paulo": (-23.55, -46.63),
    "Singapore": (1.35, 103.82), "Sydney": (-33.87, 151.21), "Tel Aviv": (32.09, 34.78),
    "Tokyo": (35.68, 139.65), "Toronto": (43.65, -79.38), "Warsaw": (52.23, 21.01),
    "Washington DC": (38.91, -77.04),
}  # fmt: skip
_CITY_NAMES = tuple(CITIES)
# time of day -> (sky at the top, sky at the horizon, light tint of every sunlit surface)
_TIMES = {
    "morning": ((110, 160, 225), (205, 222, 240), (1.0, 0.97, 0.92)),
    "midday": ((55, 115, 210), (175, 205, 238), (1.08, 1.08, 1.08)),
    "dusk": ((60, 55, 115), (250, 150, 90), (0.85, 0.7, 0.6)),
    "night": ((8, 12, 30), (40, 45, 75), (0.3, 0.3, 0.38)),
}
_CARS = np.array([(180, 30, 30), (30, 60, 150), (200, 200, 205), (25, 25, 28), (90, 95, 100),
                  (230, 190, 40), (40, 110, 60)], np.float32)  # fmt: skip
_EXIF6 = Image.Exif()
_EXIF6[0x0112] = 6  # Orientation 6: the viewer must rotate 90° clockwise
_PAD = 64  # the noise bank is this much larger than an image, so crops at random offsets differ


@dataclass(frozen=True)
class Scene:
    """The few knobs that captions and scores talk about; everything else is just decoration."""

    city: str
    time: str
    green: float  # trees and grass, 0..1
    height: float  # building height, 0..1
    cloud: float  # cloud cover, 0..1
    grey: float  # desaturation, 0..1
    cars: int


def _scene(rng: np.random.Generator, city: str) -> Scene:
    time = str(rng.choice(list(_TIMES), p=[0.3, 0.35, 0.2, 0.15]))
    return Scene(city, time, float(rng.beta(1.2, 1.2)), float(rng.random()), float(rng.random()),
                 float(rng.beta(1.2, 2.5)), int(rng.integers(0, 9)))  # fmt: skip


def _pick(words: tuple[str, ...], x: float) -> str:
    return words[min(int(x * len(words)), len(words) - 1)]


def _captions(s: Scene, rng: np.random.Generator) -> list[str]:
    """Words for the scene knobs, so a full-text query like "leafy" finds green streets."""
    trees = _pick(("treeless", "sparsely planted", "tree-lined", "leafy green"), s.green)
    bldg = _pick(("low houses", "mid-rise apartment blocks", "tall office towers"), s.height)
    sky = _pick(("a clear blue sky", "a partly cloudy sky", "an overcast grey sky"), s.cloud)
    sky = "a dark night sky" if s.time == "night" else sky
    when = {"morning": "in the morning", "midday": "at midday", "dusk": "at dusk"}.get(s.time)
    cars = ("an empty road with no cars", "a single car") + ("a few cars",) * 3
    cars = (cars + ("busy traffic with many cars",) * 4)[s.cars]
    district = _pick(("suburban", "residential", "downtown"), s.height)
    caps = [f"a {trees} street with {bldg} under {sky} in {s.city}",
            f"{cars} on the road {when or 'at night'}",
            f"a {_pick(('colourful', 'muted', 'drab grey'), s.grey)} {district} scene in {s.city}"]
    return caps[: int(rng.integers(1, 4))]


def _scores(s: Scene, rng: np.random.Generator) -> dict[str, str]:
    """Scores as Place Pulse strings; the linear terms give retrieval tests something to find."""
    night, dusk, clear = s.time == "night", s.time == "dusk", 1.0 - s.cloud
    base = (3.0 + 0.55 * s.cars + 1.2 * dusk - 1.5 * s.grey,
            3.5 + 4.0 * s.green - 2.5 * s.grey + 1.2 * clear,
            6.5 - 3.0 * s.green - 0.35 * s.cars + 1.5 * s.grey,
            2.5 + 4.0 * s.grey + 1.5 * night + 1.5 * s.cloud - 2.5 * s.green,
            4.5 + 2.5 * s.green - 2.0 * night - 1.5 * s.grey,
            3.5 + 2.5 * s.green + 1.5 * s.height - 1.5 * s.grey)  # fmt: skip
    noisy = np.clip(np.array(base) + rng.normal(0.0, 0.6, len(base)), 0.0, 10.0)
    return {k: f"{v:.2f}" for k, v in zip(PERCEPTIONS, noisy, strict=True)}


def _box(img: np.ndarray, x0: float, y0: float, x1: float, y1: float, col: np.ndarray) -> None:
    """Fill a rectangle, clamping both ends: a negative end would otherwise wrap around."""
    h, w = img.shape[:2]
    ya, yb = (min(max(int(v), 0), h) for v in (y0, y1))
    xa, xb = (min(max(int(v), 0), w) for v in (x0, x1))
    img[ya:yb, xa:xb] = col


def _sky(sky: np.ndarray, s: Scene, rng: np.random.Generator) -> None:
    """Gradient sky; clouds are thresholded sums of separable cosines (cheap outer products)."""
    top, bottom, light = _TIMES[s.time]
    hh, w = sky.shape[:2]
    f = np.linspace(0.0, 1.0, hh, dtype=np.float32)[:, None, None]
    sky[:] = np.array(top, np.float32) * (1 - f) + np.array(bottom, np.float32) * f
    fx, fy, px, py = rng.uniform(0.5, 6.0, (4, 4)).astype(np.float32)
    x = np.linspace(0.0, 2 * np.pi, w, dtype=np.float32)
    y = np.linspace(0.0, np.pi, hh, dtype=np.float32)
    tex = sum(np.outer(np.cos(fy[k] * y + py[k]), np.cos(fx[k] * x + px[k])) for k in range(4))
    m = np.clip((tex / 2 + 2 * s.cloud - 1) * 2.5, 0.0, 1.0)[..., None]
    cloud = np.float32(235 - 90 * s.cloud) * np.array(light, np.float32)
    sky += (cloud - sky) * m


def _ground(g: np.ndarray, s: Scene, rng: np.random.Generator, vx: int, r: float, tint) -> None:
    """Road, lane dashes and pavement meeting at the vanishing point; d is in road half-widths."""
    gh, w = g.shape[:2]
    t = (np.arange(gh, dtype=np.float32)[:, None] + 1.0) / gh
    d = np.abs(np.arange(w, dtype=np.float32)[None, :] - vx) * (1.0 / (r * t * gh))
    g[:] = np.array((150, 146, 138), np.float32) * tint
    np.copyto(g, np.float32(72 * rng.uniform(0.8, 1.2)) * tint, where=(d < 1)[..., None])
    if s.green > 0.35:
        grass = np.array((70, 125, 50), np.float32) * tint
        np.copyto(g, grass, where=((d > 1.05) & (d < 1.3))[..., None])
    dash = (d < 0.025) & (np.sin(6.0 / t) > 0.3)
    np.copyto(g, np.float32(220) * tint, where=dash[..., None])
    g *= (0.8 + 0.3 * t)[..., None]


def _facades(img: np.ndarray, s: Scene, rng: np.random.Generator, vx: int, hz: int, r: float,
             tint) -> None:  # fmt: skip
    """Both street walls at once: each column maps to a depth, each depth range to a building."""
    h, w = img.shape[:2]
    x = np.arange(w, dtype=np.float32)
    t = np.abs(x - vx) / (1.45 * r * (h - hz))
    z = 1.0 / np.maximum(t, 1e-3)
    bid = (z / rng.uniform(3, 8)).astype(np.int64) % 16 + 16 * (x > vx)
    ratio = (1.8 + 18 * s.height**1.5) * rng.uniform(0.5, 1.3, 32)[bid]
    inv_u = 1.0 / np.maximum(t * (h - hz), 1e-3)
    a = (hz * inv_u + 1.0) - np.arange(h, dtype=np.float32)[:, None] * inv_u  # camera heights
    mask = (a > 0) & (a < ratio) & (t > 0.02)
    fa, zc = a * np.float32(1 / 1.15), z * 0.9
    fl, col = fa - np.floor(fa), zc - np.floor(zc)
    win = mask & (fl > 0.35) & (fl < 0.8) & ((col > 0.25) & (col < 0.7)) & (a > 1.2)
    pal = rng.uniform(60, 215, (32, 3)).astype(np.float32) * tint
    wall = pal[bid] * np.where(x > vx, 0.78, 1.0).astype(np.float32)[:, None]
    np.copyto(img, wall, where=mask[..., None])
    np.copyto(img, np.array((60, 75, 95), np.float32) * tint, where=win[..., None])
    if s.time == "night":
        lit = win & ((np.floor(fa) * 7 + np.floor(zc) * 13) % 5 < 2)
        np.copyto(img, np.array((235, 200, 120), np.float32), where=lit[..., None])


def _blob(img: np.ndarray, cx: float, cy: float, rx: float, ry: float, col, phase: float) -> None:
    """A leafy crown: an ellipse with a wobbly edge and mottled shading."""
    h, w = img.shape[:2]
    x0, x1 = max(int(cx - 1.2 * rx), 0), min(int(cx + 1.2 * rx) + 1, w)
    y0, y1 = max(int(cy - 1.2 * ry), 0), min(int(cy + 1.2 * ry) + 1, h)
    if x0 >= x1 or y0 >= y1:
        return
    dx = (np.arange(x0, x1, dtype=np.float32)[None, :] - cx) / rx
    dy = (np.arange(y0, y1, dtype=np.float32)[:, None] - cy) / ry
    inside = dx**2 + dy**2 < 1 + 0.25 * np.sin(6 * dx + phase) * np.cos(5 * dy - phase)
    shade = (1.0 - 0.25 * dy + 0.08 * np.sin(dx * 13 + phase) * np.sin(dy * 17 + dx * 5))[..., None]
    sub = img[y0:y1, x0:x1]
    sub[:] = np.where(inside[..., None], col * shade, sub)


def _trees(img: np.ndarray, s: Scene, rng: np.random.Generator, vx: int, hz: int, r: float,
           tint) -> None:  # fmt: skip
    h = img.shape[0]
    for t in np.sort(rng.uniform(0.08, 1.1, int(rng.poisson(s.green * 9)))):
        u = t * (h - hz)
        cx, base, rad = vx + rng.choice((-1, 1)) * 1.25 * r * u, hz + u, u * rng.uniform(0.6, 1.1)
        _box(img, cx - 0.06 * u, base - 1.6 * u, cx + 0.06 * u, base,
             np.array((70, 50, 35), np.float32) * tint)  # fmt: skip
        leaf = np.array((50, 105, 40), np.float32) * rng.uniform(0.7, 1.3, 3) * tint
        _blob(img, cx, base - 1.6 * u - 0.5 * rad, rad, rad * 1.1, leaf, rng.uniform(0, 6.3))


def _cars(img: np.ndarray, s: Scene, rng: np.random.Generator, vx: int, hz: int, r: float,
          tint) -> None:  # fmt: skip
    """Cars seen from behind, far ones first so near ones overlap them."""
    h = img.shape[0]
    for t in np.sort(rng.uniform(0.12, 1.0, s.cars)):
        u, body = t * (h - hz), _CARS[rng.integers(len(_CARS))] * tint
        cx, y = vx + rng.uniform(-0.75, 0.75) * r * u, hz + u
        x0, x1 = cx - 0.38 * u, cx + 0.38 * u
        _box(img, x0, y - 0.45 * u, x1, y - 0.08 * u, body)
        _box(img, x0 + 0.08 * u, y - 0.62 * u, x1 - 0.08 * u, y - 0.45 * u, body * 0.8)
        _box(img, x0 + 0.12 * u, y - 0.58 * u, x1 - 0.12 * u, y - 0.47 * u, np.float32(40) * tint)
        for wx in (x0 + 0.04 * u, x1 - 0.2 * u):
            _box(img, wx, y - 0.12 * u, wx + 0.16 * u, y, np.float32(20))


def _render(s: Scene, rng: np.random.Generator, noise: tuple, size: tuple[int, int]):
    """Draw at half resolution (4x less numpy work), upscale for lens softness, add fine grain."""
    coarse, fine = noise
    w, h = max(size[0] // 2, 1), max(size[1] // 2, 1)
    hz, vx = int(h * rng.uniform(0.38, 0.5)), int(w * rng.uniform(0.35, 0.65))
    r = rng.uniform(1.5, 2.5)  # road half-width in camera heights
    tint = np.array(_TIMES[s.time][2], np.float32)
    img = np.empty((h, w, 3), np.float32)
    _sky(img[:hz], s, rng)
    _ground(img[hz:], s, rng, vx, r, tint)
    _facades(img, s, rng, vx, hz, r, tint)
    _trees(img, s, rng, vx, hz, r, tint)
    _cars(img, s, rng, vx, hz, r, tint)
    lum = img @ np.array([0.299, 0.587, 0.114], np.float32)
    img *= np.float32(1.0 - s.grey)  # blend towards grey by s.grey
    img += lum[..., None] * np.float32(s.grey)
    oy, ox, fy, fx = rng.integers(0, _PAD, 4)
    img += coarse[oy : oy + h, ox : ox + w, None] * np.float32(rng.uniform(2.0, 5.0))
    half = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    grain = fine.crop((fx, fy, fx + size[0], fy + size[1]))
    return ImageChops.add(half.resize(size, Image.Resampling.BILINEAR), grain, 1.0, -128)


def _noise_bank(rng: np.random.Generator, size: tuple[int, int]) -> tuple:
    """Noise made once per dump; per-image random crops are much cheaper than fresh noise."""
    w, h = size
    coarse = rng.standard_normal((h // 2 + _PAD, w // 2 + _PAD), dtype=np.float32)
    fine = rng.normal(128.0, 3.0, (h + _PAD, w + _PAD, 3)).clip(0, 255).astype(np.uint8)
    return coarse, Image.fromarray(fine)


def _pp_name(rng: np.random.Generator, city: str) -> str:
    """`{lat}_{lon}_{24-hex ObjectId}_{City}.JPG`, scattered a few km around the city centre."""
    lat, lon = np.array(CITIES.get(city, (0.0, 0.0))) + rng.normal(0.0, 0.03, 2)
    return f"{lat:.6f}_{lon:.6f}_{rng.bytes(12).hex()}_{city}.JPG"


def _sample(rng: np.random.Generator, noise: np.ndarray, size: tuple[int, int]):
    city = _CITY_NAMES[int(rng.integers(len(_CITY_NAMES)))]
    name, s = _pp_name(rng, city), _scene(rng, city)
    rec = {"Image Name": name, "Relative Path": f"images\\{city}\\{name}",
           "Caption": _captions(s, rng), **_scores(s, rng)}  # fmt: skip
    return rec, _render(s, rng, noise, size)


def generate_sample_dump(
    root: str | Path, n: int, seed: int = 0, size: tuple[int, int] = (640, 480),
    metadata: bool = True, quality: int = 90,
) -> list[dict]:  # fmt: skip
    """Write n JPEGs and metadata.json under root; return the metadata records written."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    root = Path(root)
    rng = np.random.default_rng(seed)
    noise, records = _noise_bank(rng, size), []
    for _ in range(n):
        rec, img = _sample(rng, noise, size)
        path = root / rec["Relative Path"].replace("\\", "/")
        path.parent.mkdir(parents=True, exist_ok=True)
        img.save(path, "JPEG", quality=quality)
        records.append(rec)
    if metadata:
        root.mkdir(parents=True, exist_ok=True)
        (root / "metadata.json").write_text(json.dumps(records, indent=1))
    return records


# ---------------------------------------------------------------- hostile inputs
def _truncated(path: Path, img: Image.Image) -> None:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    path.write_bytes(buf.getvalue()[: buf.tell() // 2])


def _write_bomb(path: Path, w: int = 20000, h: int = 20000) -> None:
    """A valid 1-bit PNG of zeros: ~220 KB on disk (level 1 is 3x faster), 400 M pixels."""
    comp, rows = zlib.compressobj(1), b"\x00" * (1 + (w + 7) // 8) * 500
    body = b"".join(comp.compress(rows) for _ in range(h // 500)) + comp.flush()

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", body)
                     + chunk(b"IEND", b""))  # fmt: skip


def _save_frames(path: Path, img: Image.Image) -> None:
    frames = [img.resize((160, 120)).rotate(a) for a in (0, 120, 240)]
    frames[0].save(path, "WEBP", save_all=True, append_images=frames[1:], duration=100, loop=0)


def _symlink_out(outside: Path) -> Callable[[Path, Image.Image], None]:
    def write(path: Path, img: Image.Image) -> None:
        target = outside / "outside_target.jpg"
        img.save(target, "JPEG", quality=90)
        path.symlink_to(target.resolve())

    return write


def _unreadable(path: Path, img: Image.Image) -> None:
    img.save(path, "JPEG", quality=90)
    os.chmod(path, 0)  # root still reads it: callers must not rely on a PermissionError


def _saver(fmt: str, convert: str | None = None, **kw) -> Callable[[Path, Image.Image], None]:
    return lambda p, im: (im.convert(convert) if convert else im).save(p, fmt, **kw)


def _file_kinds(src: Path, outside: Path, pp_name: Callable[[], str]) -> dict:
    """kind -> (file name under images/bad/, writer(path, fresh distinct RGB image))."""
    return {
        "truncated": ("bad_truncated.jpg", _truncated),
        "empty": ("bad_empty.jpg", lambda p, im: p.write_bytes(b"")),
        "not_image": ("bad_not_image.jpg", lambda p, im: p.write_bytes(b"not an image\n" * 40)),
        "wrong_extension": ("bad_wrong_extension.jpg", _saver("PNG", compress_level=1)),
        "bomb": ("bad_bomb.png", lambda p, im: _write_bomb(p)),
        "animated": ("bad_animated.webp", _save_frames),
        "cmyk": ("bad_cmyk.jpg", _saver("JPEG", "CMYK", quality=90)),
        "sixteen_bit": ("bad_sixteen_bit.png", lambda p, im: Image.fromarray(
            np.asarray(im.convert("L"), np.uint16) * 257).save(p, "PNG", compress_level=1)),
        "palette_alpha": ("bad_palette_alpha.png", lambda p, im: im.quantize(
            64, method=Image.Quantize.FASTOCTREE).save(p, "PNG", transparency=0, compress_level=1)),
        "exif_rotated": ("bad_exif_rotated.jpg", _saver("JPEG", quality=90, exif=_EXIF6)),
        "one_pixel": ("bad_one_pixel.png", lambda p, im: im.resize((1, 1)).save(p, "PNG")),
        "panorama": ("bad_panorama.jpg", lambda p, im: im.resize((10000, 400)).save(p, "JPEG")),
        "symlink_outside": ("bad_symlink_outside.jpg", _symlink_out(outside)),
        "duplicate": (pp_name(), lambda p, im: shutil.copyfile(src, p)),
        "bad_scores": (pp_name(), _saver("JPEG", quality=90)),
        "unreadable": ("bad_unreadable.jpg", _unreadable),
        "long_caption": ("bad_long_caption.jpg", _saver("JPEG", quality=90)),
    }  # fmt: skip


_PATH_ROWS = {"escape_path": "..\\..\\etc\\passwd", "absolute_path": "/etc/passwd",
              "drive_letter": "C:\\Windows\\win.ini", "url_encoded": "%2e%2e/%2e%2e/etc/passwd",
              "missing": "images\\bad\\bad_missing.jpg"}  # fmt: skip


def _bad_row(kind: str, rel: str, rng: np.random.Generator) -> dict:
    """A metadata row that is well formed except for what `kind` is about."""
    s = _scene(rng, "bad")
    row = {"Image Name": rel.replace("\\", "/").rsplit("/", 1)[-1], "Relative Path": rel,
           "Caption": [f"hostile input: {kind.replace('_', ' ')}"], **_scores(s, rng)}  # fmt: skip
    if kind == "bad_scores":
        row.update(zip(PERCEPTIONS[:4], ("abc", "NaN", "inf", ""), strict=True))
        del row["safer"]
    if kind == "long_caption":
        row["Caption"] = [("a very long caption " * 5000)[:100_000]]
    return row


def write_bad_inputs(root: str | Path, outside: str | Path) -> dict[str, str]:
    """Add one file per hostile-input kind to an existing dump; returns {kind: relative path}.

    Files land in images/bad/ and get metadata rows; path-only kinds (escape_path, missing, ...)
    only get a row, and their value is the raw "Relative Path" of that row.  Re-running replaces
    the earlier hostile files and rows instead of adding more.
    """
    root, outside = Path(root), Path(outside)
    src = min((p for p in (root / "images").rglob("*.JPG") if p.parent.name != "bad"), default=None)
    if src is None:
        raise FileNotFoundError(f"no dump images under {root / 'images'}; generate a dump first")
    rng = np.random.default_rng([0xBAD, 0x1DEA])  # a stream no int seed of a real dump shares
    noise, bad = _noise_bank(rng, (640, 480)), root / "images" / "bad"
    bad.mkdir(parents=True, exist_ok=True)
    outside.mkdir(parents=True, exist_ok=True)
    city = src.stem.rsplit("_", 1)[-1]
    out: dict[str, str] = {}
    for kind, (name, write) in _file_kinds(src, outside, lambda: _pp_name(rng, city)).items():
        (bad / name).unlink(missing_ok=True)
        write(bad / name, _render(_scene(rng, city), rng, noise, (640, 480)))
        out[kind] = f"images/bad/{name}"
    rows = [_bad_row(k, v.replace("/", "\\"), rng) for k, v in out.items()]
    rows += [_bad_row(k, v, rng) for k, v in _PATH_ROWS.items()]
    out.update(_PATH_ROWS)
    meta = root / "metadata.json"
    old = json.loads(meta.read_text()) if meta.exists() else []
    fresh = {r["Relative Path"] for r in rows}
    kept = [r for r in old if r.get("Relative Path") not in fresh]
    meta.write_text(json.dumps(kept + rows, indent=1))
    return out
