"""``mmrag report RUN_ID``: one self-contained HTML page for a query run.

The run's answers file is read as written (not through ``read_answers``' current schema), so a
file of any schema version renders and optional columns such as ``boxes`` are drawn only when
the file has them.  Thumbnails are read through ``report_images.Thumbnailer`` (trusted roots
and image hashes); plots come from ``report_plots``; the page from ``report_templates``.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import pyarrow.parquet as pq
from markupsafe import Markup, escape

from schemas.answers import ANSWERS_DIR
from schemas.tables import FILES_TABLE, IMAGES_TABLE, SCORE_COLUMNS
from tasks.io.answers import dataset_files, dataset_root, validate_run_id
from tasks.io.objstore import StorageConfig, filesystem, is_local
from tasks.report.boxes import boxes_by_target
from tasks.report.images import Thumb, Thumbnailer, ledger_roots, png_data_uri
from tasks.report.plots import score_heatmap, similarity_plots
from tasks.report.templates import render

DEFAULT_MAX_QUERIES = 200
_CITATION = re.compile(r"\[\s*(\d{1,9}(?:\s*,\s*\d{1,9})*)\s*\]")
TINY_NOTE = ("profile 'tiny': random-weight models, so similarities and answers are "
             "meaningless; the report shows the machinery, not retrieval quality")


class RunNotFound(LookupError):
    """No answers file for the run id under the output root."""


def find_run(out: str, run_id: str, storage: StorageConfig | None = None) -> list[str]:
    """``{out}/answers/run_date=*/{run_id}.parquet``, latest partition first."""
    name = validate_run_id(run_id) + ".parquet"
    root = f"{dataset_root(out)}/{ANSWERS_DIR}"
    found = [p for p in dataset_files(root, storage) if p.rsplit("/", 1)[-1] == name]
    if not found:
        raise RunNotFound(f"no answers for run {run_id!r} under {root}")
    return sorted(found, key=lambda p: p.rsplit("/", 2)[-2], reverse=True)


def load_run(out: str, run_id: str, storage: StorageConfig | None = None):
    """(rows, schema version, run_date, path, column names) of the run's latest file."""
    paths = find_run(out, run_id, storage)
    fs_, _ = filesystem(f"{dataset_root(out)}/{ANSWERS_DIR}", storage)
    table = pq.read_table(paths[0], filesystem=fs_)
    meta = table.schema.metadata or {}
    version = meta.get(b"mmrag.schema_version", b"?").decode()
    run_date = paths[0].rsplit("/", 2)[-2].removeprefix("run_date=")
    return table.to_pylist(), version, run_date, paths, table.column_names


def trusted_roots(db: str | None, images_table: str | None,
                  storage: StorageConfig | None = None) -> list[str]:
    """Dump roots from the ``files`` ledger next to ``images_table`` (none if no database)."""
    if not db or (is_local(db) and not Path(db.removeprefix("file://")).exists()):
        return []
    from tasks.io import store

    name = FILES_TABLE + (images_table or IMAGES_TABLE).removeprefix(IMAGES_TABLE)
    try:
        return ledger_roots(store.connect(db, storage).open_table(name).to_polars())
    except Exception:  # noqa: BLE001 - no ledger: only the explicit roots are trusted
        return []


def _fmt(v, digits: int = 2) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    return f"{v:.{digits}f}"


def answer_html(text: str, idx: int, ranks: set[int]) -> Markup:
    """Escaped answer with each ``[n]`` of a retrieved rank linked to that hit's card."""
    parts, pos = [], 0
    for m in _CITATION.finditer(text):
        nums = [int(n) for n in m.group(1).split(",")]
        links = [Markup('<a class="cite" href="#q{}-hit{}">{}</a>').format(idx, n, n)
                 if n in ranks else escape(n) for n in nums]
        parts += [escape(text[pos:m.start()]), Markup("[{}]").format(Markup(", ").join(links))]
        pos = m.end()
    return Markup("").join([*parts, escape(text[pos:])])


def _hit(h: dict, idx: int, thumbs: Thumbnailer, boxes: dict, cited: set[int]) -> dict:
    caption = h.get("caption") or ""
    return {
        "rank": h.get("rank"), "city": h.get("city"), "similarity": _fmt(h.get("similarity"), 3),
        "scores": [(s.replace("_", " "), _fmt(h.get(s))) for s in SCORE_COLUMNS],
        "caption": caption if len(caption) <= 300 else caption[:299] + "…",
        "thumb": thumbs.thumb(h.get("source_uri"), h.get("image_id")),
        "boxes": boxes.get(h.get("rank"), []), "cited": h.get("rank") in cited,
    }


def _query(row: dict, idx: int, thumbs: Thumbnailer, counts: dict) -> dict:
    hits = row.get("retrieved") or []
    boxes, unmatched = boxes_by_target(row.get("boxes"), hits)
    cited = set(row.get("citations") or [])
    answer = row.get("answer")
    ms = [f"{k.removesuffix('_ms')} {row[k]:.0f} ms" for k in ("retrieval_ms", "generation_ms")
          if isinstance(row.get(k), float) and math.isfinite(row[k])]
    q = {
        "idx": idx, "query_id": row.get("query_id"), "mode": row.get("mode"),
        "top_k": row.get("top_k"), "text": row.get("query_text"), "filter": row.get("filter"),
        "error": row.get("error"), "error_stage": row.get("error_stage"),
        "query_image": row.get("query_image"),
        "query_thumb": thumbs.thumb(row.get("query_image")) if row.get("query_image") else Thumb(),
        "query_boxes": boxes.get(None, []), "answer": answer,
        "answer_html": answer_html(answer, idx, {h.get("rank") for h in hits}) if answer else "",
        "citations": ", ".join(f"[{c}]" for c in sorted(cited)), "generator": row.get("generator"),
        "hits": [_hit(h, idx, thumbs, boxes, cited) for h in hits], "ms": " · ".join(ms),
    }
    shown = [(q["query_thumb"], q["query_boxes"])] + [(h["thumb"], h["boxes"]) for h in q["hits"]]
    drawn = sum(len(b) for t, b in shown if t.uri)  # a box on a missing thumbnail is not drawn
    counts["boxes"] += drawn
    counts["unmatched"] += unmatched + sum(len(b) for b in boxes.values()) - drawn
    return q


def _distinct(rows: list[dict], key: str) -> str:
    values = sorted({str(r.get(key)) for r in rows if r.get(key) is not None})
    return ", ".join(values) or "–"


def _mean_ms(rows: list[dict], key: str) -> str:
    xs = [r[key] for r in rows if isinstance(r.get(key), float) and math.isfinite(r[key])]
    return f"{sum(xs) / len(xs):.1f} ms" if xs else "–"


def run_summary(rows: list[dict], meta: dict) -> list[tuple[str, str]]:
    """The run's facts as (label, value) rows, in reading order."""
    errors: dict[str, int] = {}
    for r in rows:
        if r.get("error_stage") or r.get("error"):
            stage = r.get("error_stage") or "?"
            errors[stage] = errors.get(stage, 0) + 1
    answered = sum(1 for r in rows if (r.get("answer") or "").strip())
    hits = [h for r in rows for h in (r.get("retrieved") or [])]
    return [
        ("run", meta["run_id"]), ("run date", meta["run_date"]), ("file", meta["path"]),
        ("schema version", meta["version"]), ("queries", str(len(rows))),
        ("answered", str(answered)),
        ("errors by stage", ", ".join(f"{k}={v}" for k, v in sorted(errors.items())) or "none"),
        ("engine / model",
         f"{_distinct(rows, 'generator')} / {_distinct(rows, 'generator_model')}"),
        ("CLIP model", _distinct(rows, "clip_model")),
        ("database / table", f"{_distinct(rows, 'db')} / {_distinct(rows, 'images_table')}"),
        ("table version", _distinct(rows, "table_version")),
        ("images retrieved", f"{len(hits)} hits, {len({h.get('image_id') for h in hits})} "
                             "distinct images"),
        ("mean retrieval / generation", f"{_mean_ms(rows, 'retrieval_ms')} / "
                                        f"{_mean_ms(rows, 'generation_ms')}"),
        ("boxes", meta["boxes"]),
    ]


def build_run_report(out: str, run_id: str, *, db: str | None = None,
                     image_roots: list[str] | None = None, max_queries: int = DEFAULT_MAX_QUERIES,
                     max_pixels: int = 64_000_000,
                     storage: StorageConfig | None = None) -> tuple[str, dict]:
    """(HTML, summary) for ``run_id``'s answers under ``out``."""
    rows, version, run_date, paths, columns = load_run(out, run_id, storage)
    table = next((r.get("images_table") for r in rows if r.get("images_table")), None)
    roots = [*(image_roots or []), *trusted_roots(db, table, storage)]
    thumbs = Thumbnailer(roots, max_pixels, storage)
    counts = {"boxes": 0, "unmatched": 0}
    queries = [_query(r, i, thumbs, counts) for i, r in enumerate(rows[:max_queries], 1)]
    hits = [h | {"mode": r.get("mode")} for r in rows for h in (r.get("retrieved") or [])]
    boxes = (f"{counts['boxes']} drawn" + (f", {counts['unmatched']} not drawn (no such image "
                                           "or no thumbnail)"
                                           if counts["unmatched"] else "")
             if "boxes" in columns else "none (file has no boxes column)")
    meta = {"run_id": run_id, "run_date": run_date, "path": paths[0], "version": version,
            "boxes": boxes}
    notes = _notes(rows, paths, max_queries, roots)
    plots = [("mean perception scores of retrieved images per city",
              png_data_uri(score_heatmap(hits, "mean perception scores of retrieved images"))),
             ("similarity distributions", png_data_uri(similarity_plots(hits)))]
    html = render("run", title=f"mmrag run {run_id}", notes=notes, summary=run_summary(rows, meta),
                  plots=plots, queries=queries)
    return html, {"queries": len(rows), "shown": len(queries), "boxes": counts["boxes"],
                  "path": paths[0], "thumbnails": thumbs.loaded}


def _notes(rows: list[dict], paths: list[str], max_queries: int, roots: list[str]) -> list[str]:
    notes = []
    if any("tiny" in str(r.get("clip_model") or "") for r in rows):
        notes.append(TINY_NOTE)
    if len(rows) > max_queries:
        notes.append(f"showing the first {max_queries} of {len(rows)} queries (--max-queries)")
    if len(paths) > 1:
        notes.append(f"run id found in {len(paths)} partitions; showing the latest ({paths[0]})")
    if not roots:
        notes.append("no trusted image roots (no files ledger, no --image-root): "
                     "thumbnails are not shown")
    return notes
