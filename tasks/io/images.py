"""Read, hash and decode image files into fixed-size RGB pixel arrays.

A plain function over a batch of rows (Ray Data calls it in CPU tasks).  Every failure becomes a
row with a ``stage`` and a readable ``error``; nothing here raises for a bad input.

The pixels are exactly open_clip's inference transform up to the tensor (torchvision's
``Resize`` of the shorter side, bicubic, the longer side truncated; ``CenterCrop`` with rounded
offsets; RGB conversion after the crop), applied to the upright (EXIF-oriented) image, so the
vectors are those of the reference model.  One deliberate difference, on by default: JPEGs are
decoded at reduced size (``Image.draft``), which is most of the decode cost; ``reduced=False``
(``MMRAG_REDUCED_DECODE=false``) gives exact parity.  Images with alpha, 16-bit or palette
images are made RGB first (alpha composited on white), where open_clip would drop the alpha.
"""

from __future__ import annotations

import hashlib
import io
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from tasks.io.objstore import StorageConfig, filesystem

_ORIENTATION_TAG = 0x0112
_SWAPS_AXES = {5, 6, 7, 8}
#: larger files are rejected after reading this many bytes: a decode task holds whole files in
#: memory, and an image within the pixel limit (64 MP) is far smaller, even as a 16-bit PNG
MAX_FILE_BYTES = 512 * 1024 * 1024


class Rejected(Exception):
    """An input that cannot be ingested; ``stage`` says where it failed."""

    def __init__(self, stage: str, error: str):
        super().__init__(f"{stage}: {error}")
        self.stage, self.error = stage, error


def read_bytes(uri: str, storage: StorageConfig | None = None,
               max_bytes: int = MAX_FILE_BYTES) -> bytes:
    """Local paths by ``open``; URIs through pyarrow's filesystems (s3://, gs://, …).

    ``storage`` says how to reach s3:// (endpoint, region); None = the SDK's defaults.
    Never reads more than ``max_bytes`` + 1 bytes: a larger file is rejected."""
    try:
        if "://" not in uri:
            with open(uri, "rb") as f:
                data = f.read(max_bytes + 1)
        else:
            fs_, path = filesystem(uri, storage)
            with fs_.open_input_stream(path) as f:
                data = f.read(max_bytes + 1)
    except FileNotFoundError as e:
        raise Rejected("missing", f"file disappeared before it could be read ({e.strerror})") from e
    except PermissionError as e:
        raise Rejected("read", f"permission denied ({e.strerror})") from e
    except OSError as e:
        raise Rejected("read", f"cannot read file: {e}") from e
    if len(data) > max_bytes:
        raise Rejected("decode", f"file too large: over the limit of {max_bytes:,} bytes "
                       "(memory guard)")
    return data


#: modes open_clip resizes as they are, converting to RGB after the crop
_NATIVE_MODES = {"RGB", "L", "CMYK"}


def decode(data: bytes, size: int, max_pixels: int,
           reduced: bool = True) -> tuple[np.ndarray, int, int]:
    """Bytes → (uint8 (size, size, 3), width, height after EXIF orientation)."""
    im, width, height = open_image(data, size, max_pixels, reduced)
    if im.mode not in _NATIVE_MODES:
        im = to_rgb(im)
    return clip_crop(im, size), width, height


def clip_crop(im: Image.Image, size: int) -> np.ndarray:
    """open_clip's ``Resize(size)`` + ``CenterCrop(size)`` + RGB, as torchvision computes them."""
    w, h = im.size
    new = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
    if new != (w, h):
        im = im.resize(new, Image.Resampling.BICUBIC)
    left, top = int(round((new[0] - size) / 2.0)), int(round((new[1] - size) / 2.0))
    return np.asarray(im.crop((left, top, left + size, top + size)).convert("RGB"),
                      dtype=np.uint8)


def open_rgb(data: bytes, size: int, max_pixels: int) -> tuple[Image.Image, int, int]:
    """Bytes → (oriented RGB image decoded at reduced scale where possible, width, height);
    prompts, reports and augmentations use it."""
    im, width, height = open_image(data, size, max_pixels)
    return to_rgb(im), width, height


def open_image(data: bytes, size: int, max_pixels: int,
               reduced: bool = True) -> tuple[Image.Image, int, int]:
    """Bytes → (loaded, EXIF-oriented image in its own mode, width, height).

    The one place that applies the ingest guards (pixel limit before decoding, PIL's bomb
    warning as an error, every failure a ``Rejected`` with its reason).  ``reduced``: JPEGs
    are decoded at the smallest DCT scale that still covers ``size``."""
    if not data:
        raise Rejected("decode", "empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
            width, height = _oriented_size(im)
            if width * height > max_pixels:
                raise Rejected(
                    "decode",
                    f"image too large: {width}x{height} = {width * height:,} pixels exceeds the "
                    f"limit of {max_pixels:,} (decompression-bomb guard)",
                )
            return _load(im, size, reduced), width, height
    except Rejected:
        raise
    except UnidentifiedImageError as e:
        raise Rejected("decode", "not an image (unrecognised format)") from e
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise Rejected("decode", f"image too large (decompression-bomb guard): {e}") from e
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise Rejected("decode", f"corrupt or truncated image: {e}") from e


def _oriented_size(im: Image.Image) -> tuple[int, int]:
    width, height = im.size
    try:
        orientation = im.getexif().get(_ORIENTATION_TAG)
    except Exception:  # noqa: BLE001 - a broken EXIF block must not hide a readable image
        orientation = None
    return (height, width) if orientation in _SWAPS_AXES else (width, height)


def _load(im: Image.Image, size: int, reduced: bool) -> Image.Image:
    if reduced and im.format == "JPEG":
        im.draft("RGB", (size, size))
    im.load()
    return ImageOps.exif_transpose(im)


def to_rgb(im: Image.Image) -> Image.Image:
    """Any mode to RGB: alpha composited on white, 16-bit scaled down, palette expanded."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(im, dtype=np.float64)
        top = 65535.0 if arr.max() > 255 else 255.0
        return Image.fromarray((arr / top * 255).clip(0, 255).astype(np.uint8)).convert("RGB")
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA"):
        im = im.convert("RGBA")
        background = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, im).convert("RGB")
    return im.convert("RGB")


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def decode_batch(batch: dict[str, np.ndarray], size: int, max_pixels: int,
                 storage: StorageConfig | None = None, reduced: bool = True) -> dict:
    """Ray Data ``map_batches`` function: adds image_id, width, height, pixels, stage, error.

    "" (not None) marks "no value": Ray turns an all-None object column into float NaN.
    ``storage`` travels with the task because Ray workers may not share the driver's env.
    """
    n = len(batch["source_uri"])
    pixels = np.zeros((n, size, size, 3), dtype=np.uint8)
    image_id = np.full(n, "", dtype=object)
    stage, error = np.full(n, "", dtype=object), np.full(n, "", dtype=object)
    width, height = np.zeros(n, dtype=np.int64), np.zeros(n, dtype=np.int64)
    for i, uri in enumerate(batch["source_uri"]):
        try:
            data = read_bytes(str(uri), storage)
            image_id[i] = sha256(data)
            pixels[i], width[i], height[i] = decode(data, size, max_pixels, reduced)
        except Rejected as r:
            stage[i], error[i] = r.stage, r.error
        except Exception as e:  # noqa: BLE001 - one file must never stop the batch
            stage[i], error[i] = "decode", f"unexpected {type(e).__name__}: {e}"
    out = dict(batch)
    out.update(image_id=image_id, width=width, height=height, pixels=pixels)
    out.update(stage=stage, error=error)
    return out


