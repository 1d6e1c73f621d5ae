"""Checks of an answers run that need no second model (``mmrag evaluate --answers RUN``).

- citations: the prompt numbers the retrieved items ``[1]..[n]``; each answer's ``[n]``
  references are parsed back (``tasks.query.prompts.parse_citations``) against the number of items
  that query retrieved, and a number outside ``1..n`` is a fabricated citation;
- empty and too-long answers, and errors by stage (query | retrieve | generate);
- optionally the CLIP score: cosine between the query text and each retrieved image, the image
  re-embedded from its file.  Files are found through the ``images`` table by ``image_id``,
  never through paths written in the answers file, so an edited file cannot make us read
  anything the ingest did not accept.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections import defaultdict

import numpy as np
import polars as pl

from tasks.io import store
from tasks.io.answers import read_answers, validate_run_id
from tasks.io.images import Rejected, decode, read_bytes
from tasks.io.objstore import StorageConfig, is_local, storage_options
from tasks.models.clip import Clip
from tasks.query.prompts import parse_citations

STAGES = ("query", "retrieve", "generate")
MAX_TEXT_CHARS = 1000
_NEEDED = {"run_id": pl.String, "query_text": pl.String, "answer": pl.String,
           "error": pl.String, "error_stage": pl.String, "generator": pl.String,
           "db": pl.String, "images_table": pl.String, "table_version": pl.Int64,
           "clip_model": pl.String}
_HEX = re.compile(r"[0-9a-f]{64}")


class AnswersNotFound(Exception):
    """The run id has no answers under the output root, or the file does not exist."""


def load_answers(ref: str, out_root: str, storage: StorageConfig | None = None) -> pl.DataFrame:
    """``ref`` is the path of one answers Parquet file, or a run id looked up under
    ``out_root/answers`` (every run_date partition holding it)."""
    if ref.endswith(".parquet") or "/" in ref or os.sep in ref:
        if is_local(ref) and not os.path.isfile(ref.removeprefix("file://")):
            raise AnswersNotFound(f"answers file not found: {ref}")
        frame = pl.read_parquet(ref, storage_options=storage_options(ref, storage))
    else:
        run_id = validate_run_id(ref)
        frame = read_answers(out_root, storage).filter(pl.col("run_id") == run_id).collect()
    if frame.is_empty():
        raise AnswersNotFound(f"no answers for {ref!r} (looked under {out_root}/answers)")
    missing = [pl.lit(None, t).alias(c) for c, t in _NEEDED.items() if c not in frame.columns]
    if "retrieved" not in frame.columns:
        missing.append(pl.lit(None, pl.List(pl.Struct({"image_id": pl.String}))).alias("retrieved"))
    return frame.with_columns(missing) if missing else frame


def provenance(frame: pl.DataFrame) -> dict:
    """The answers run's own provenance, carried by its metric rows."""
    first = frame.row(0, named=True)
    return {"answers_run_id": ",".join(sorted(frame["run_id"].drop_nulls().unique())) or None,
            **{k: first[k] for k in ("db", "images_table", "table_version", "clip_model")}}


def answer_checks(frame: pl.DataFrame, max_chars: int) -> list[dict]:
    """Metric rows: error_rate per stage over all rows; empty_answer over generated answers
    (no error, engine not ``none``); citations and length over the non-empty ones."""
    rows = frame.select("answer", "retrieved", "error", "error_stage", "generator").to_dicts()
    n = len(rows)
    stages = sorted(set(STAGES) | {r["error_stage"] for r in rows if r["error_stage"]})
    out = [_row("error_rate", sum(r["error_stage"] == s for r in rows) / n, n, s)
           for s in stages]
    generated = [r for r in rows if r["error"] is None and r["generator"] != "none"]
    if generated:
        texts = [r for r in generated if (r["answer"] or "").strip()]
        out.append(_row("empty_answer", 1 - len(texts) / len(generated), len(generated)))
    else:
        texts = []
    if texts:
        parsed = [parse_citations(r["answer"], len(r["retrieved"] or [])) for r in texts]
        out += [
            _row("cites_only_retrieved", _share(not bad for _, bad in parsed), len(texts)),
            _row("no_citation", _share(not ok and not bad for ok, bad in parsed), len(texts)),
            _row("too_long_answer", _share(len(r["answer"]) > max_chars for r in texts),
                 len(texts)),
        ]
    return out


def _share(flags) -> float:
    flags = list(flags)
    return sum(flags) / len(flags)


def _row(metric: str, value: float, n: int, subset: str | None = None,
         city: str | None = None) -> dict:
    return {"task": "answers", "variant": None, "subset": subset, "city": city,
            "metric": metric, "value": float(value), "n_queries": int(n)}


def clip_scores(frame: pl.DataFrame, images, clip: Clip, max_pixels: int,
                storage: StorageConfig | None = None) -> list[dict]:
    """Mean cosine of (query text, retrieved image) pairs, overall and per city of the image;
    ``clip_score_missing`` counts pairs whose image could not be found or read."""
    pairs = [(r["query_text"], h["image_id"], h.get("city"))
             for r in frame.select("query_text", "retrieved", "error").iter_rows(named=True)
             if r["query_text"] and r["error"] is None for h in (r["retrieved"] or [])]
    if not pairs:
        return []
    texts = sorted({t for t, _, _ in pairs})
    text_vec = dict(zip(texts, _encode_texts(clip, texts), strict=True))
    image_vec = _embed_images(images, sorted({i for _, i, _ in pairs if i}), clip, max_pixels,
                              storage)
    by_city: dict[str | None, list[float]] = defaultdict(list)
    for text, image_id, city in pairs:
        if image_id in image_vec:
            by_city[city].append(float(text_vec[text] @ image_vec[image_id]))
    scored = [s for sims in by_city.values() for s in sims]
    out = [_row("clip_score_missing", len(pairs) - len(scored), len(pairs))]
    if scored:
        out.append(_row("clip_score", np.mean(scored), len(scored)))
    out += [_row("clip_score", np.mean(s), len(s), city=c)
            for c, s in sorted(by_city.items(), key=lambda kv: str(kv[0])) if c is not None]
    return out


def _encode_texts(clip: Clip, texts: list[str]) -> np.ndarray:
    texts = [t[:MAX_TEXT_CHARS] for t in texts]
    return np.concatenate([clip.encode_texts(texts[i : i + 256])
                           for i in range(0, len(texts), 256)])


def _embed_images(images, ids: list[str], clip: Clip, max_pixels: int,
                  storage: StorageConfig | None) -> dict[str, np.ndarray]:
    """image_id → vector of its file as the images table records it; unreadable ones left out."""
    uris: dict[str, str] = {}
    good = [i for i in ids if _HEX.fullmatch(i)]
    for start in range(0, len(good), 500):
        uris.update(store.known_images(images, good[start : start + 500]))
    vectors: dict[str, np.ndarray] = {}
    batch: list[tuple[str, np.ndarray]] = []
    for n, (image_id, uri) in enumerate(sorted(uris.items()), 1):
        with contextlib.suppress(Rejected):  # counted by the caller as clip_score_missing
            batch.append((image_id, decode(read_bytes(uri, storage), clip.input_size,
                                           max_pixels)[0]))
        if batch and (len(batch) == 32 or n == len(uris)):
            encoded = clip.encode_pixels(np.stack([p for _, p in batch]))
            vectors.update(zip([i for i, _ in batch], encoded, strict=True))
            batch = []
    return vectors
