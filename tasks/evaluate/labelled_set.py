"""The labelled set of ``mmrag evaluate``: queries whose right answers the table itself knows.

- text→image and hybrid: a sampled image's own caption is the query (its text vector, plus the
  text for the full-text side of hybrid); relevant = every image whose caption is exactly that
  text, so sampled images sharing a caption make one query;
- image→image: seeded augmented copies (``tasks.evaluate.augment``) of a sampled image, read from
its
  source file (local or object storage) and decoded as query images are; relevant = the original.
- hybrid with an image: one augmented copy (``crop`` when evaluated, else the first kind) as the
  vector side and the first line of the caption as the full-text side; relevant = the original.
  The words narrow the candidates, the picture picks among them: the case reranking is for.

The sample is drawn without replacement from the sorted image ids of the pinned table version,
so the same seed on the same version gives the same labelled set.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence

import numpy as np
import polars as pl
import pyarrow as pa

from tasks.evaluate.augment import augment
from tasks.io.images import Rejected, decode, read_bytes, sha256
from tasks.io.objstore import StorageConfig
from tasks.models.clip import Clip
from tasks.query.retrieve import Pinned

MAX_QUERY_CHARS = 1000  # CLIP reads 77 tokens; a 100 000-char caption must not reach full-text
QUERY_SCHEMA = {"query_id": pl.String, "task": pl.String, "subset": pl.String,
                "city": pl.String, "text": pl.String, "target": pl.String,
                "relevant": pl.List(pl.String), "vector": pl.List(pl.Float32),
                "error": pl.String}
_SAMPLE_COLUMNS = {"image_id": pl.String, "source_uri": pl.String, "city": pl.String,
                   "caption": pl.String}
_HEX = re.compile(r"[0-9a-f]{64}")
_BATCH = 32


def sample_images(pinned: Pinned, n: int, seed: int) -> pl.DataFrame:
    """``n`` images without replacement; the same seed on the same version, the same sample."""
    ids = sorted(set(pinned.table.search().select(["image_id"]).limit(None).to_arrow()
                     ["image_id"].to_pylist()) - {None})
    ids = [i for i in ids if _HEX.fullmatch(i)]
    if n <= 0 or not ids:
        return pl.DataFrame(schema=_SAMPLE_COLUMNS)
    pick = np.random.default_rng(seed).choice(len(ids), size=min(n, len(ids)), replace=False)
    chosen = [ids[i] for i in sorted(pick)]
    parts = [_scan(pinned.table, "image_id IN (" + ",".join(f"'{i}'" for i in chunk) + ")",
                   list(_SAMPLE_COLUMNS)) for chunk in _chunks(chosen, 500)]
    return pl.from_arrow(pa.concat_tables(parts)).cast(_SAMPLE_COLUMNS).sort("image_id")


def caption_owners(table, captions: Sequence[str]) -> dict[str, list[str]]:
    """caption → sorted ids of every image whose caption is exactly that text."""
    owners: dict[str, list[str]] = {c: [] for c in captions}
    for chunk in _chunks(list(owners), 100):
        where = "caption IN (" + ",".join(_literal(c) for c in chunk) + ")"
        found = _scan(table, where, ["image_id", "caption"])
        for image_id, caption in zip(*found.to_pydict().values(), strict=True):
            owners.setdefault(caption, []).append(image_id)
    return {c: sorted(ids) for c, ids in owners.items()}


def _scan(table, where: str, columns: list[str]) -> pa.Table:
    return table.search().where(where).select(columns).limit(None).to_arrow()


def _literal(text: str) -> str:
    """A LanceDB SQL string literal: quotes doubled (backslashes are literal there)."""
    if "\x00" in text:
        raise ValueError("a caption with a NUL character cannot be matched")
    return "'" + text.replace("'", "''") + "'"


def _chunks(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def text_queries(pinned: Pinned, clip: Clip, sample: pl.DataFrame) -> list[dict]:
    """One text2image and one hybrid query per distinct usable caption of the sample."""
    usable = sample.filter(pl.col("caption").str.strip_chars().str.len_chars() > 0,
                           ~pl.col("caption").str.contains("\x00", literal=True))
    first = usable.unique("caption", keep="first", maintain_order=True)
    owners = caption_owners(pinned.table, first["caption"].to_list())
    texts = [c[:MAX_QUERY_CHARS] for c in first["caption"].to_list()]
    vectors = [clip.encode_texts(texts[i : i + 256]) for i in range(0, len(texts), 256)]
    matrix = np.concatenate(vectors) if vectors else np.zeros((0, 1), np.float32)
    rows = []
    for task, prefix in (("text2image", "t"), ("hybrid", "h")):
        for i, r in enumerate(first.iter_rows(named=True)):
            relevant = sorted(set(owners.get(r["caption"], [])) | {r["image_id"]})
            rows.append({"query_id": f"{prefix}{i:05d}", "task": task, "subset": None,
                         "city": r["city"], "text": texts[i], "target": r["image_id"],
                         "relevant": relevant, "vector": matrix[i].tolist(), "error": None})
    return rows


def image_queries(clip: Clip, sample: pl.DataFrame, kinds: Sequence[str], seed: int,
                  max_pixels: int, storage: StorageConfig | None = None) -> list[dict]:
    """One image2image query per (sampled image, augmentation kind), read from its source file,
    plus one hybrid_image query per captioned image; a file that is gone or no longer has the
    ingested bytes makes its queries errors."""
    rows: list[dict] = []
    pending: list[tuple[list[dict], np.ndarray]] = []
    hybrid_kind = "crop" if "crop" in kinds else (kinds[0] if kinds else None)
    for r in sample.iter_rows(named=True):
        data, error = _source(r, storage)
        for kind in kinds:
            group = [_image_row(r, kind, "image2image", None, error, len(rows))]
            words = _first_line(r["caption"])
            if kind == hybrid_kind and words:
                group.append(_image_row(r, kind, "hybrid_image", words, error, len(rows) + 1))
            rows += group
            if data is None:
                continue
            try:
                copy = augment(data, kind, seed, r["image_id"], max_pixels)
                pending.append((group, decode(copy, clip.input_size, max_pixels)[0]))
            except Rejected as e:
                for row in group:
                    row["error"] = f"augmented copy rejected ({e.stage}): {e.error}"
            if len(pending) >= _BATCH:
                _embed(clip, pending)
    _embed(clip, pending)
    return rows


def _image_row(r: dict, kind: str, task: str, text: str | None, error: str | None,
               n: int) -> dict:
    return {"query_id": f"i{n:05d}", "task": task, "subset": kind, "city": r["city"],
            "text": text, "target": r["image_id"], "relevant": [r["image_id"]],
            "vector": None, "error": error}


def _first_line(caption: str | None) -> str | None:
    line = (caption or "").strip().split("\n", 1)[0].strip()[:MAX_QUERY_CHARS]
    return line if line and "\x00" not in line else None


def _source(row: dict, storage: StorageConfig | None) -> tuple[bytes | None, str | None]:
    try:
        data = read_bytes(row["source_uri"], storage)
    except Rejected as e:
        return None, f"source image unreadable ({e.stage}): {e.error}"
    if sha256(data) != row["image_id"]:
        return None, "source file changed since it was ingested"
    return data, None


def _embed(clip: Clip, pending: list[tuple[list[dict], np.ndarray]]) -> None:
    if pending:
        vectors = clip.encode_pixels(np.stack([p for _, p in pending]))
        for (group, _), vector in zip(pending, vectors, strict=True):
            for row in group:
                row["vector"] = vector.tolist()
        pending.clear()


def queries_frame(rows: list[dict]) -> pl.DataFrame:
    return pl.DataFrame(rows, schema=QUERY_SCHEMA) if rows else pl.DataFrame(schema=QUERY_SCHEMA)


def labelled_queries(pinned: Pinned, clip: Clip, sample: pl.DataFrame, kinds: Sequence[str],
                     seed: int, max_pixels: int,
                     storage: StorageConfig | None = None) -> pl.DataFrame:
    """text2image + hybrid + image2image queries of one sample, one row each (QUERY_SCHEMA)."""
    return queries_frame(text_queries(pinned, clip, sample)
                         + image_queries(clip, sample, kinds, seed, max_pixels, storage))
