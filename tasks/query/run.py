"""Query-flow core: plan → retrieved hits (Parquet) → prompts + grids → engine → answer rows.

Plain functions; ``flows/query.py`` wires them.  Every query produces exactly one answer row:
a bad row, a failed search, a question too long for the model or a failed generation is
recorded in ``error``/``error_stage``.  Prompts and answers are made on Ray
(``tasks.query.generate``); boxes and citations are read back here.
"""

from __future__ import annotations

import json
import logging
import time
from datetime import UTC, datetime
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from schemas.answers import RETRIEVED_TYPE
from schemas.queries import BOUND_COLUMNS
from tasks.io import atomic
from tasks.io.objstore import StorageConfig
from tasks.models.clip import ClipSpec, model_shape
from tasks.models.engines import EngineConfig
from tasks.models.text import TextSpec
from tasks.query.boxes import Tile, parse_boxes
from tasks.query.embed import CAPTION_MODES, RayEmbed, embed_captions, embed_plan
from tasks.query.generate import GenerateOptions, generate
from tasks.query.grid import GRID_SIZE
from tasks.query.prompts import parse_citations
from tasks.query.retrieve import pin_images, search_all

log = logging.getLogger(__name__)
__all__ = ["GRID_SIZE", "respond", "retrieve", "summary"]


def retrieve(plan_path: Path, out_path: Path, db_uri: str, spec: ClipSpec, max_pixels: int,
             search_opts: dict | None = None, suffix: str | None = None,
             storage: StorageConfig | None = None, ray_embed: RayEmbed | None = None,
             text: TextSpec | None = None) -> dict:
    """Embed and search every good query at one pinned version; write hits next to the plan.

    Large plans are embedded in Ray (``ray_embed``); the CLIP model is released either way
    before this returns, so the generation engine starts on a GPU without it.  ``text``: the
    caption encoder (None: no caption space).  Each row's ``search_options`` records the
    spaces it searched."""
    plan = pl.read_parquet(plan_path)
    pinned = pin_images(db_uri, model_shape(spec)[0], spec.label, suffix=suffix, storage=storage,
                        caption_label=text.label if text else None)
    start = time.perf_counter()
    captions = _caption_vectors(plan, pinned, text)
    vectors, errors = embed_plan(plan, spec, max_pixels, ray_embed)
    embed_ms = (time.perf_counter() - start) * 1000 / max(plan.height, 1)
    timings: dict[int, float] = {}
    used: dict[int, list[str]] = {}
    hits = search_all(pinned, plan, vectors, errors, search_opts, timings, captions, used)
    retrieved = pa.array([hits.get(i, []) for i in range(plan.height)], pa.list_(RETRIEVED_TYPE))
    stage = [("query" if e else ("retrieve" if i in errors else None))
             for i, e in enumerate(plan["error"].to_list())]
    out = plan.with_columns(
        error=pl.Series([e or errors.get(i) for i, e in enumerate(plan["error"].to_list())],
                        dtype=pl.String),
        error_stage=pl.Series(stage, dtype=pl.String),
        table_version=pl.lit(pinned.version, pl.Int64),
        images_table=pl.lit(pinned.name), clip_model=pl.lit(spec.label), db=pl.lit(db_uri),
        search_options=pl.Series([_options(search_opts, used.get(i), pinned.caption_note)
                                  for i in range(plan.height)], dtype=pl.String),
        retrieval_ms=pl.Series([embed_ms + timings[i] if i in timings else None
                                for i in range(plan.height)], dtype=pl.Float32),
    ).to_arrow().append_column("retrieved", retrieved)
    atomic.write_parquet(out, out_path)
    return {"queries": plan.height, "bad_rows": int(plan["error"].is_not_null().sum()),
            "retrieve_errors": len(errors), "table_version": pinned.version}


def _caption_vectors(plan: pl.DataFrame, pinned, text: TextSpec | None):
    """The caption-space query vectors, when a row needs them and the table can serve them."""
    needs = plan.filter(pl.col("error").is_null(), pl.col("mode").is_in(list(CAPTION_MODES)))
    if text is None or not needs.height:
        return None
    if pinned.caption_note:
        log.warning("caption space unavailable: %s; hybrid queries search the other spaces, "
                    "caption queries fail", pinned.caption_note)
        return None
    return embed_captions(plan, text)


def _options(opts: dict | None, spaces: list[str] | None, note: str | None) -> str:
    """The search knobs as JSON, with the spaces this query searched (and, when the caption
    space was left out, why)."""
    out = dict(opts or {}) | {"spaces_used": spaces or []}
    if note and "caption" in str(out.get("spaces", "")) and spaces and "caption" not in spaces:
        out["caption_note"] = note
    return json.dumps(out, sort_keys=True)


def respond(retrieved_path: Path, engine: EngineConfig, vlm_model: str, run_id: str,
            options: GenerateOptions, progress=None,
            storage: StorageConfig | None = None) -> list[dict]:
    """One answer row per query; rows with errors skip the prompt and the engine, the others
    go through the Ray generation pipeline (``tasks.query.generate``)."""
    table = pq.read_table(retrieved_path)
    rows = pl.from_arrow(table).to_dicts()
    out = [_answer_row(r, run_id, engine.name, vlm_model) for r in rows]
    todo = table.append_column("_i", pa.array(range(table.num_rows), pa.int64())).filter(
        pc.is_null(table["error"]))
    for result in generate(todo, engine, options, storage, progress):
        i = result["_i"]
        _fill(out[i], result, len(rows[i]["retrieved"] or []), engine.box_convention)
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


def _fill(row: dict, res: dict, n_context: int, convention: str = "padded") -> None:
    """Put one generation result (``tasks.query.generate`` columns) into its answer row."""
    tiles = [Tile(**t) for t in json.loads(res.get("tiles") or "[]")]
    answer, boxes = parse_boxes(res.get("text"), tiles, GRID_SIZE, convention)
    valid, _ = parse_citations(answer, n_context)
    row.update(prompt=res.get("prompt"),
               prompt_images=[t.image_id for t in tiles if t.rank is not None],
               answer=answer, raw_answer=res.get("text"), boxes=boxes, citations=valid,
               n_prompt_tokens=res.get("n_prompt_tokens"),
               n_generated_tokens=res.get("n_generated_tokens"),
               n_context_dropped=res.get("n_context_dropped"),
               prompt_token_budget=res.get("token_budget"),
               generation_ms=res.get("generation_ms"), created_at=datetime.now(UTC))
    error = res.get("error") or res.get("gen_error")
    if error:
        row.update(error=error, error_stage="generate")


def summary(rows: list[dict]) -> dict:
    errors: dict[str, int] = {}
    for r in rows:
        if r["error_stage"]:
            errors[r["error_stage"]] = errors.get(r["error_stage"], 0) + 1
    answered = sum(1 for r in rows if r.get("answer"))
    return {"queries": len(rows), "answered": answered, "errors": errors}


