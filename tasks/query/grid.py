"""The one prompt picture: the query photo and the best hits tiled into a labelled square.

Why one grid image: LLaVA-1.5 is trained on a single 336×336 image per conversation; several
``<image>`` tokens work poorly (and its HF processor centre-crops non-square inputs).  So the
query photo and the best hits are tiled into one square picture, each tile labelled in a corner
("Q", "1", "2" …) so the model and the prompt can refer to the same photo.  At most
``MAX_GRID = 4`` tiles: a 2×2 grid gives each photo 168 px at the 336-px input, already half
the native resolution; a 3×3 grid (112 px) leaves little a street scene can be judged from.
"""

from __future__ import annotations

from PIL import Image, ImageDraw, ImageFont, ImageOps

from tasks.io.images import open_rgb, read_bytes, to_rgb
from tasks.io.objstore import StorageConfig

MAX_GRID = 4
GRID_SIZE = 336  # LLaVA-1.5's input size: the grid is never resized by its processor
_MISSING_TILE = (128, 128, 128)
_BACKGROUND = (0, 0, 0)


def load_thumbnail(uri: str, size: int, max_pixels: int = 64_000_000,
                   storage: StorageConfig | None = None) -> Image.Image | None:
    """An RGB image fitting in ``size``×``size`` (aspect kept), or None on any failure.

    A missing photo must only grey out its tile, never fail the query, hence no exceptions.
    Same guards as ingest: pixel limit checked before decoding, PIL's bomb warning as error.
    """
    try:
        im = open_rgb(read_bytes(uri, storage), size, max_pixels)[0]
        im.thumbnail((size, size), Image.Resampling.BICUBIC)
        return im
    except Exception:  # noqa: BLE001 - any unreadable input becomes a grey tile
        return None


def _label_font(tile: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's bundled font (no files, no network), scaled to the tile when FreeType exists."""
    try:
        return ImageFont.load_default(size=max(10, tile // 7))
    except (ImportError, OSError):
        return ImageFont.load_default()


def _tile(image: Image.Image | None, label: str, tile: int) -> Image.Image:
    """One tile: the photo fitted and centred (or grey when missing), its label top-left."""
    canvas = Image.new("RGB", (tile, tile), _MISSING_TILE if image is None else _BACKGROUND)
    if image is not None:
        fitted = ImageOps.contain(to_rgb(image), (tile, tile), Image.Resampling.BICUBIC)
        canvas.paste(fitted, ((tile - fitted.width) // 2, (tile - fitted.height) // 2))
    draw = ImageDraw.Draw(canvas)
    font = _label_font(tile)
    left, top, right, bottom = draw.textbbox((0, 0), label, font=font)
    pad = max(2, tile // 40)
    draw.rectangle((0, 0, right - left + 2 * pad, bottom - top + 2 * pad), fill=(255, 255, 255))
    draw.text((pad - left, pad - top), label, fill=(0, 0, 0), font=font)
    return canvas


def build_grid(images: list[Image.Image | None], labels: list[str],
               size: int = 336) -> Image.Image:
    """``size``×``size`` RGB: one image letterboxed, or 2–4 in a 2×2 grid (unused tiles black).

    Square on purpose: LLaVA-1.5's processor centre-crops, which would cut tiles off a
    non-square grid.  Pure function of its inputs, so identical inputs give identical pixels.
    """
    if not 1 <= len(images) <= MAX_GRID:
        raise ValueError(f"build_grid takes 1..{MAX_GRID} images, got {len(images)}")
    if len(labels) != len(images):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    if len(images) == 1:
        return _tile(images[0], labels[0], size)
    tile = size // 2
    grid = Image.new("RGB", (size, size), _BACKGROUND)
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        grid.paste(_tile(image, label, tile), ((i % 2) * tile, (i // 2) * tile))
    draw = ImageDraw.Draw(grid)  # thin separators so adjacent photos do not merge
    draw.line((tile - 1, 0, tile - 1, size), fill=(255, 255, 255), width=2)
    draw.line((0, tile - 1, size, tile - 1), fill=(255, 255, 255), width=2)
    return grid
