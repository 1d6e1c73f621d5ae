"""Thumbnails for the HTML reports: small JPEG data URIs, read only from trusted roots.

The paths a report shows come from data (answers files, ``rejects`` rows, query rows), so a
file is read only when its real location lies under a root the operator already trusts: the
dump roots recorded in the ``files`` ledger, ``MMRAG_QUERY_IMAGE_ROOTS`` and ``--image-root``.
A retrieved image must also still hash to its ``image_id``: a file changed since ingest would
show a picture the retriever never saw.  Every failure is a reason string, never an exception.
"""

from __future__ import annotations

import base64
import io
import os
from dataclasses import dataclass, field

from PIL import Image

from tasks.io.images import Rejected, open_rgb, read_bytes, sha256
from tasks.io.objstore import StorageConfig, is_local

THUMB_PX = 160
JPEG_QUALITY = 72


@dataclass
class Thumb:
    """A data URI with its pixel size, or the reason there is none."""

    uri: str | None = None
    width: int = 0
    height: int = 0
    reason: str | None = None


def ledger_roots(files_lf) -> list[str]:
    """Dump roots of a ``files`` ledger: ``source_uri`` minus ``/rel_path``, distinct."""
    import polars as pl

    rows = (files_lf.select("source_uri", "rel_path").unique()
            .with_columns(n=pl.col("source_uri").str.len_chars() - pl.col("rel_path")
                          .str.len_chars() - 1)
            .filter(pl.col("n") > 0)
            .select(root=pl.col("source_uri").str.slice(0, pl.col("n")),
                    ok=pl.col("source_uri").str.ends_with("/" + pl.col("rel_path")))
            .filter("ok").select("root").unique().collect())
    return sorted(rows["root"].to_list())


def _norm_root(root: str) -> str:
    if is_local(root):
        return os.path.realpath(str(root).removeprefix("file://"))
    return str(root).rstrip("/")


@dataclass
class Thumbnailer:
    """Reads confined files once each and caches their data URIs by (path, expected hash)."""

    roots: list[str]
    max_pixels: int = 64_000_000
    storage: StorageConfig | None = None
    px: int = THUMB_PX
    _cache: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.roots = sorted({_norm_root(r) for r in self.roots if r})

    def confine(self, path: str | None) -> str | None:
        """The readable location of ``path`` when it lies under a trusted root, else None.

        Relative paths are tried under each local root in turn (query images are given
        relative to the queries file, which the report does not know)."""
        if not path or "\x00" in path:
            return None
        if not is_local(path):
            parts = path.split("://", 1)[1].split("/")
            if ".." in parts or "." in parts:
                return None
            return path if any(path.startswith(r + "/") for r in self.roots) else None
        raw = path.removeprefix("file://")
        bases = [""] if os.path.isabs(raw) else [r for r in self.roots if is_local(r)]
        for base in bases:
            real = os.path.realpath(os.path.join(base, raw))
            if any(os.path.commonpath([real, r]) == r for r in self.roots if is_local(r)) \
                    and os.path.isfile(real):
                return real
        return None

    @property
    def loaded(self) -> int:
        """Distinct files shown as thumbnails so far."""
        return sum(1 for t in self._cache.values() if t.uri)

    def thumb(self, path: str | None, image_id: str | None = None) -> Thumb:
        """Thumbnail of ``path``; with ``image_id``, only if the bytes still hash to it."""
        key = (path, image_id)
        if key not in self._cache:
            self._cache[key] = self._make(path, image_id)
        return self._cache[key]

    def _make(self, path: str | None, image_id: str | None) -> Thumb:
        if not path:
            return Thumb(reason="no path")
        where = self.confine(path)
        if where is None:
            return Thumb(reason="missing, or outside the trusted roots")
        try:
            data = read_bytes(where, self.storage)
            if image_id and sha256(data) != image_id:
                return Thumb(reason="file changed since ingest (hash differs)")
            im = open_rgb(data, self.px, self.max_pixels)[0]
        except Rejected as r:
            return Thumb(reason=r.error)
        except Exception as e:  # noqa: BLE001 - one bad file must not stop a report
            return Thumb(reason=f"unreadable: {type(e).__name__}")
        return encode(im, self.px)


def encode(im: Image.Image, px: int = THUMB_PX) -> Thumb:
    """RGB image → JPEG data URI fitting in ``px``×``px``, aspect ratio kept."""
    im = im.copy()
    im.thumbnail((px, px), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=JPEG_QUALITY, optimize=True)
    b64 = base64.b64encode(buf.getvalue()).decode("ascii")
    return Thumb(f"data:image/jpeg;base64,{b64}", im.width, im.height)


def png_data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")
