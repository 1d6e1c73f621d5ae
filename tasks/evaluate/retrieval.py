"""Retrieval metrics of ``mmrag evaluate``: ranked lists against the labelled set's relevant ids.

The labelled set (``tasks.evaluate.labelled_set``) holds text→image, image→image and hybrid queries
with
their relevant image ids.  Here they are searched, scored (recall@1/5/10 and MRR, overall, per
augmentation and per city) and written as the metrics table (``schemas/metrics.py``).

- Spaces: hybrid queries fuse the image, caption and full-text rankings; ``SPACE_VARIANTS``
  (``mmrag evaluate --spaces``) evaluates each combination as a variant.  The labelled set's
  text is an image's own caption, so it flatters the caption and full-text spaces (see
  docs/guide/evaluate.md for how to decide on real weights).
- ANN vs exact: the same text and image query vectors with the variant's ANN options against
  ``bypass_vector_index()`` (brute force).  Measured on every table; without a vector index
  both sides are brute force, recorded with ``subset = no_index`` (expect 1.0).

Every query runs through ``tasks.query.retrieve.search_all`` once per *variant* (a name → search
options), so a new retrieval option is evaluated by adding a variant, not code.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Collection, Sequence

import numpy as np
import polars as pl
import pyarrow as pa

from schemas.metrics import METRICS_DIR, METRICS_SCHEMA
from schemas.queries import QUERY_PLAN_SCHEMA
from tasks.io import answers
from tasks.io.objstore import StorageConfig, storage_options
from tasks.models.text import TextSpec, load_text, release_text
from tasks.query.fusion import parse_spaces
from tasks.query.retrieve import TEXT_BATCH, Pinned, search_all

KS = (1, 5, 10)
DEPTH = max(KS)
RETRIEVAL_TASKS = ("text2image", "image2image", "hybrid", "hybrid_image")
_MODES = {"text2image": "text", "image2image": "image", "hybrid": "hybrid",
          "hybrid_image": "hybrid"}
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}")
#: the hybrid space combinations ``--spaces`` evaluates (name → spaces option)
SPACE_VARIANTS = {"image_only": "image", "caption_only": "caption",
                  "image+caption": "image+caption", "image+text": "image+text",
                  "caption+text": "caption+text", "all": "image+caption+text"}


# --- metrics: pure functions of ranked id lists and relevant sets ---------------------------


def recall_at_k(ranked: Sequence[Sequence[str]], relevant: Sequence[Collection[str]],
                k: int) -> float:
    """Share of queries with at least one relevant id among their first ``k`` (NaN: none)."""
    _check(ranked, relevant, k)
    found = sum(any(i in rel for i in r[:k]) for r, rel in zip(ranked, relevant, strict=True))
    return found / len(ranked) if ranked else math.nan


def mrr(ranked: Sequence[Sequence[str]], relevant: Sequence[Collection[str]],
        depth: int = DEPTH) -> float:
    """Mean of 1/rank of the first relevant id within ``depth`` (0 when none; NaN: no query)."""
    _check(ranked, relevant, depth)
    total = 0.0
    for r, rel in zip(ranked, relevant, strict=True):
        total += next((1.0 / pos for pos, i in enumerate(r[:depth], 1) if i in rel), 0.0)
    return total / len(ranked) if ranked else math.nan


def overlap_at_k(approx: Sequence[Sequence[str]], exact: Sequence[Sequence[str]],
                 k: int) -> float:
    """ANN recall@k: mean share of each exact top ``k`` also in the approximate top ``k``."""
    _check(approx, exact, k)
    shares = [len(set(a[:k]) & set(e[:k])) / len(e[:k])
              for a, e in zip(approx, exact, strict=True) if e]
    return sum(shares) / len(shares) if shares else math.nan


def _check(ranked: Sequence, other: Sequence, k: int) -> None:
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    if len(ranked) != len(other):
        raise ValueError(f"{len(ranked)} ranked lists but {len(other)} reference sets")


# --- variants: named search options ---------------------------------------------------------


def parse_variant(spec: str) -> tuple[str, dict]:
    """``name=key:value,key:value`` → (name, options); values become int, float, bool or None
    (``none``/``null``/``off``) when they parse as such, else stay strings."""
    name, sep, body = spec.partition("=")
    name = name.strip()
    if not sep or not _NAME.fullmatch(name):
        raise ValueError(f"variant {spec!r}: expected name=key:value[,key:value…] with a name "
                         "of letters, digits, '.', '_' or '-'")
    opts = {}
    for item in (p.strip() for p in body.split(",")):
        key, colon, value = item.partition(":")
        if not item:
            continue
        if not colon or not _NAME.fullmatch(key.strip()):
            raise ValueError(f"variant {name!r}: {item!r} is not key:value")
        opts[key.strip()] = _value(value.strip())
    return name, opts


def _value(text: str) -> object:
    if text.lower() in ("", "none", "null", "off"):
        return None
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for cast in (int, float):
        try:
            number = cast(text)
        except ValueError:
            continue
        if not math.isfinite(number):
            raise ValueError(f"variant value {text!r} is not a finite number")
        return number
    return text


def resolve_variants(specs: Sequence[str], base: dict) -> dict[str, dict]:
    """``default`` (= ``base``) plus each ``--variant`` spec laid over ``base``."""
    variants, given = {"default": dict(base)}, set()
    for spec in specs:
        name, opts = parse_variant(spec)
        if name in given:
            raise ValueError(f"variant {name!r} is given twice")
        given.add(name)
        variants[name] = {**base, **opts}
        if variants[name].get("spaces") is not None:
            parse_spaces(variants[name]["spaces"])  # a bad space fails now, not per query
    return variants


# --- searching and scoring ------------------------------------------------------------------


def caption_vectors(pinned: Pinned, queries: pl.DataFrame,
                    text: TextSpec | None) -> np.ndarray | None:
    """The queries' texts in the caption space (NaN rows where none); None when the table's
    caption space cannot be searched (hybrid variants then fuse the other spaces)."""
    if text is None or pinned.caption_note or queries.is_empty():
        return None
    model, texts = load_text(text), queries["text"].to_list()
    out = np.full((len(texts), model.dim), np.nan, dtype=np.float32)
    idx = [i for i, t in enumerate(texts) if t]
    for start in range(0, len(idx), TEXT_BATCH):
        rows = idx[start : start + TEXT_BATCH]
        out[rows] = model.encode([texts[i] for i in rows])
    release_text()
    return out


def search_variant(pinned: Pinned, queries: pl.DataFrame, opts: dict,
                   depth: int = DEPTH, captions: np.ndarray | None = None) -> pl.DataFrame:
    """Every query through ``search_all`` with ``opts`` → query_id, ranked image ids, error."""
    plan = pa.Table.from_pylist(
        [{"row": i, "query_id": q["query_id"], "text": q["text"], "mode": _MODES[q["task"]],
          "top_k": depth, "error": q["error"]}
         for i, q in enumerate(queries.select("query_id", "text", "task", "error")
                               .iter_rows(named=True))],
        schema=QUERY_PLAN_SCHEMA)
    errors: dict[int, str] = {}
    hits = search_all(pinned, pl.from_arrow(plan), _matrix(queries["vector"]), errors, opts,
                      caption_vectors=captions)
    return pl.DataFrame({
        "query_id": queries["query_id"],
        "ranked": [[h["image_id"] for h in hits.get(i, [])] for i in range(queries.height)],
        "search_error": [e or errors.get(i) for i, e in enumerate(queries["error"].to_list())],
    }, schema={"query_id": pl.String, "ranked": pl.List(pl.String), "search_error": pl.String})


def _matrix(vectors: pl.Series) -> np.ndarray:
    """List column → (n, dim) float32, NaN rows where a query has no vector."""
    values = vectors.to_list()
    dim = next((len(v) for v in values if v is not None), 1)
    out = np.full((len(values), dim), np.nan, dtype=np.float32)
    for i, v in enumerate(values):
        if v is not None:
            out[i] = v
    return out


def score(queries: pl.DataFrame, ranked: pl.DataFrame, variant: str) -> list[dict]:
    """Metric rows of one variant: per task ``errors``, then recall@k and MRR over the queries
    that ran, overall, per subset (augmentation) and per city of the query's source image."""
    frame = queries.join(ranked, on="query_id", how="left")
    rows = []
    for task in RETRIEVAL_TASKS:
        part = frame.filter(pl.col("task") == task)
        if part.is_empty():
            continue
        ok = part.filter(pl.col("search_error").is_null())
        rows.append(_row(task, variant, None, None, "errors", part.height - ok.height,
                         part.height))
        groups = [(None, None, ok)]
        groups += [(s, None, ok.filter(pl.col("subset") == s))
                   for s in ok["subset"].drop_nulls().unique(maintain_order=True)]
        groups += [(None, c, ok.filter(pl.col("city") == c))
                   for c in sorted(ok["city"].drop_nulls().unique())]
        for subset, city, group in groups:
            if group.height:
                rows += _retrieval_rows(task, variant, subset, city, group)
    return rows


def _retrieval_rows(task: str, variant: str, subset: str | None, city: str | None,
                    group: pl.DataFrame) -> list[dict]:
    ranked = group["ranked"].to_list()
    relevant = [set(r) for r in group["relevant"].to_list()]
    values = {f"recall@{k}": recall_at_k(ranked, relevant, k) for k in KS}
    values["mrr"] = mrr(ranked, relevant)
    return [_row(task, variant, subset, city, m, v, group.height) for m, v in values.items()]


def _row(task: str, variant, subset, city, metric: str, value: float, n: int) -> dict:
    return {"task": task, "variant": variant, "subset": subset, "city": city,
            "metric": metric, "value": float(value), "n_queries": int(n)}


def vector_index(table) -> str | None:
    """Type of the ANN index on ``vector`` (e.g. ``IvfSq``), None when the table has none."""
    return next((str(i.index_type) for i in table.list_indices() if "vector" in i.columns), None)


def ann_vs_exact(pinned: Pinned, queries: pl.DataFrame, opts: dict, variant: str,
                 depth: int = DEPTH) -> list[dict]:
    """recall@k of the variant's ANN search (its nprobes/refine_factor) against brute force,
    over the text2image and image2image query vectors; ``subset`` names the index."""
    part = queries.filter(pl.col("task").is_in(["text2image", "image2image"]),
                          pl.col("error").is_null())
    if part.is_empty():
        return []
    matrix = _matrix(part["vector"])
    approx = _nearest(pinned.table, matrix, depth, opts, exact=False)
    exact = _nearest(pinned.table, matrix, depth, {}, exact=True)
    subset = vector_index(pinned.table) or "no_index"
    return [_row("ann_vs_exact", variant, subset, None, f"recall@{k}",
                 overlap_at_k(approx, exact, k), part.height) for k in KS]


def _nearest(table, matrix: np.ndarray, k: int, opts: dict, exact: bool) -> list[list[str]]:
    out: list[list[str]] = []
    for start in range(0, len(matrix), 256):
        block = matrix[start : start + 256]
        query = table.search(block if len(block) > 1 else block[0], vector_column_name="vector")
        query = query.distance_type("cosine")
        if exact:
            query = query.bypass_vector_index()
        for name in ("nprobes", "refine_factor"):
            if not exact and opts.get(name):
                query = getattr(query, name)(opts[name])
        found = pl.from_arrow(query.select(["image_id", "_distance"]).limit(k).to_arrow())
        if "query_index" not in found.columns:
            found = found.with_columns(query_index=pl.lit(0))
        by = {q: g.sort("_distance")["image_id"].to_list()
              for (q,), g in found.group_by("query_index")}
        out += [by.get(q, []) for q in range(len(block))]
    return out


def evaluate_retrieval(pinned: Pinned, queries: pl.DataFrame, variants: dict[str, dict],
                       captions: np.ndarray | None = None) -> list[dict]:
    """All retrieval metric rows: for each variant, the three tasks and ANN vs exact.
    ``captions``: the queries in the caption space (``caption_vectors``)."""
    rows = []
    for name, opts in variants.items():
        found = search_variant(pinned, queries, opts, captions=captions)
        opts_json = json.dumps(opts, sort_keys=True, default=str)
        rows += [r | {"search_opts": opts_json}
                 for r in score(queries, found, name) + ann_vs_exact(pinned, queries, opts, name)]
    return rows


# --- the metrics table ----------------------------------------------------------------------


def metrics_path(out_root: str, run_date: str, eval_id: str) -> str:
    """``{out}/metrics/run_date=YYYY-MM-DD/{eval_id}.parquet`` (both components validated)."""
    run_date, eval_id = answers.validate_run_date(run_date), answers.validate_run_id(eval_id)
    return f"{answers.dataset_root(out_root)}/{METRICS_DIR}/run_date={run_date}/{eval_id}.parquet"


def metrics_table(rows: list[dict]) -> pa.Table:
    """Rows → exactly ``METRICS_SCHEMA`` (missing keys null); unknown keys are a bug."""
    unknown = set().union(*rows) - set(METRICS_SCHEMA.names) if rows else set()
    if unknown:
        raise ValueError(f"metric rows have keys outside METRICS_SCHEMA: {sorted(unknown)}")
    table = pa.Table.from_pylist(rows, schema=METRICS_SCHEMA)
    return table.replace_schema_metadata(METRICS_SCHEMA.metadata)


def write_metrics(rows: list[dict], out_root: str, run_date: str, eval_id: str,
                  storage: StorageConfig | None = None) -> str:
    """Atomic like the answers (hidden temp + fsync + rename; one upload on object storage);
    re-running an ``eval_id`` replaces its file.  Returns the path."""
    final, table = metrics_path(out_root, run_date, eval_id), metrics_table(rows)
    try:
        answers.publish(table, final, storage)
    except OSError as e:
        raise OSError(f"cannot write metrics to {final}: {e}") from e
    return final


def read_metrics(out_root: str, storage: StorageConfig | None = None) -> pl.LazyFrame:
    """Every evaluation as one lazy frame with ``run_date`` from the path; older schema
    versions read with nulls in the newer columns; no files yet → an empty frame."""
    root, hive = f"{answers.dataset_root(out_root)}/{METRICS_DIR}", {"run_date": pl.Date}
    schema = pl.from_arrow(METRICS_SCHEMA.empty_table()).schema
    if not answers.has_dataset_files(root, storage):
        return pl.LazyFrame(schema={**schema, **hive})
    return pl.scan_parquet(
        f"{root}/**/*.parquet", hive_partitioning=True, hive_schema=hive, schema=schema,
        missing_columns="insert", extra_columns="ignore", hidden_file_prefix=[".", "_"],
        storage_options=storage_options(root, storage))
