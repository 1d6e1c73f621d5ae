"""Query-flow core: plan → retrieved hits (Parquet) → prompts + grids → engine → answer rows.

Plain functions; ``flows/query.py`` wires them.  Every query produces exactly one answer row:
a bad row, a failed search or a failed generation is recorded in ``error``/``error_stage``.
"""

from __future__ import annotations

import json
import logging
import time
from datetime import UTC, datetime
from pathlib import Path

import polars as pl
import pyarrow as pa

from schemas.answers import RETRIEVED_TYPE
from schemas.queries import BOUND_COLUMNS
from tasks.io import atomic
from tasks.io.objstore import StorageConfig
from tasks.models.clip import ClipSpec, load_clip, model_shape
from tasks.models.engines import Engine, GenRequest
from tasks.query.boxes import Tile, parse_boxes
from tasks.query.prompts import MAX_GRID, build_grid, build_prompt, load_thumbnail, parse_citations
from tasks.query.retrieve import embed_queries, pin_images, search_all

log = logging.getLogger(__name__)
GRID_SIZE = 336


def retrieve(plan_path: Path, out_path: Path, db_uri: str, spec: ClipSpec, max_pixels: int,
             search_opts: dict | None = None, suffix: str | None = None,
             storage: StorageConfig | None = None) -> dict:
    """Embed and search every good query at one pinned version; write hits next to the plan."""
    plan = pl.read_parquet(plan_path)
    pinned = pin_images(db_uri, model_shape(spec)[0], spec.label, suffix=suffix, storage=storage)
    clip = load_clip(spec)
    start = time.perf_counter()
    vectors, errors = embed_queries(plan, clip, max_pixels)
    embed_ms = (time.perf_counter() - start) * 1000 / max(plan.height, 1)
    timings: dict[int, float] = {}
    hits = search_all(pinned, plan, vectors, errors, search_opts, timings)
    retrieved = pa.array([hits.get(i, []) for i in range(plan.height)], pa.list_(RETRIEVED_TYPE))
    stage = [("query" if e else ("retrieve" if i in errors else None))
             for i, e in enumerate(plan["error"].to_list())]
    out = plan.with_columns(
        error=pl.Series([e or errors.get(i) for i, e in enumerate(plan["error"].to_list())],
                        dtype=pl.String),
        error_stage=pl.Series(stage, dtype=pl.String),
        table_version=pl.lit(pinned.version, pl.Int64),
        images_table=pl.lit(pinned.name), clip_model=pl.lit(spec.label), db=pl.lit(db_uri),
        search_options=pl.lit(json.dumps(search_opts or {}, sort_keys=True)),
        retrieval_ms=pl.Series([embed_ms + timings[i] if i in timings else None
                                for i in range(plan.height)], dtype=pl.Float32),
    ).to_arrow().append_column("retrieved", retrieved)
    atomic.write_parquet(out, out_path)
    return {"queries": plan.height, "bad_rows": int(plan["error"].is_not_null().sum()),
            "retrieve_errors": len(errors), "table_version": pinned.version}


def _request(row: dict, max_pixels: int,
             storage: StorageConfig | None = None) -> tuple[GenRequest, list[Tile]]:
    """Prompt text plus one grid image (query photo first, then the best hits).

    The query image is a local file; hits may live on object storage (``storage``).  The tiles
    say which photo sits where, so boxes in the answer can be mapped back to their photo."""
    hits = row["retrieved"] or []
    query_img = load_thumbnail(row["image_path"], GRID_SIZE, max_pixels) \
        if row["image_path"] else None
    shown = hits[: MAX_GRID - (1 if query_img else 0)]
    images = ([query_img] if query_img else []) + [
        load_thumbnail(h["source_uri"], GRID_SIZE, max_pixels, storage) for h in shown]
    labels = (["Q"] if query_img else []) + [str(h["rank"]) for h in shown]
    who = ([(None, None)] if query_img else []) + [(h["image_id"], h["rank"]) for h in shown]
    tiles = [Tile(i, r, *(im.size if im else (None, None)))
             for (i, r), im in zip(who, images, strict=True)]
    prompt = build_prompt(row["text"], hits, has_query_image=query_img is not None)
    grid = build_grid(images, labels, GRID_SIZE) if images else None
    return GenRequest(prompt, grid), tiles


def respond(retrieved_path: Path, engine: Engine, engine_name: str, vlm_model: str,
            run_id: str, max_pixels: int, batch_size: int = 8, progress=None,
            storage: StorageConfig | None = None) -> list[dict]:
    """One answer row per query, generated in batches; rows with errors skip the engine."""
    rows = pl.read_parquet(retrieved_path).to_dicts()
    out = [_answer_row(r, run_id, engine_name, vlm_model) for r in rows]
    todo = [i for i, r in enumerate(rows) if r["error"] is None]
    for start in range(0, len(todo), batch_size):
        idx = todo[start : start + batch_size]
        began = time.perf_counter()
        built = [_request(rows[i], max_pixels, storage) for i in idx]
        results = engine.generate([b[0] for b in built])
        ms = (time.perf_counter() - began) * 1000 / len(idx)
        for i, (req, tiles), res in zip(idx, built, results, strict=True):
            _fill(out[i], req, tiles, res, len(rows[i]["retrieved"] or []))
            out[i]["generation_ms"] = ms
        if progress:
            progress(len(idx))
    return out


def _answer_row(r: dict, run_id: str, engine: str, vlm_model: str) -> dict:
    return {
        "run_id": run_id, "query_id": r["query_id"], "query_text": r["text"],
        "query_image": r["image"], "mode": r["mode"], "top_k": r["top_k"],
        "city": r["city"], **{c: r[c] for c in BOUND_COLUMNS},
        "filter": r["where"], "db": r["db"], "images_table": r["images_table"],
        "table_version": r["table_version"], "clip_model": r["clip_model"],
        "search_options": r.get("search_options"),
        "retrieved": r["retrieved"], "generator": engine, "generator_model": vlm_model,
        "error": r["error"], "error_stage": r["error_stage"],
        "created_at": datetime.now(UTC), "retrieval_ms": r["retrieval_ms"],
    }


def _fill(row: dict, req: GenRequest, tiles: list[Tile], res, n_context: int) -> None:
    answer, boxes = parse_boxes(res.text, tiles, GRID_SIZE)
    valid, _ = parse_citations(answer, n_context)
    row.update(prompt=req.prompt, prompt_images=[t.image_id for t in tiles if t.rank is not None],
               answer=answer, raw_answer=res.text, boxes=boxes, citations=valid,
               n_prompt_tokens=res.n_prompt_tokens, n_generated_tokens=res.n_generated_tokens,
               created_at=datetime.now(UTC))
    if res.error:
        row.update(error=res.error, error_stage="generate")


def summary(rows: list[dict]) -> dict:
    errors: dict[str, int] = {}
    for r in rows:
        if r["error_stage"]:
            errors[r["error_stage"]] = errors.get(r["error_stage"], 0) + 1
    answered = sum(1 for r in rows if r.get("answer"))
    return {"queries": len(rows), "answered": answered, "errors": errors}


