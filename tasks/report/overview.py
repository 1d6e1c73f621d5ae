"""``mmrag report --overview``: one HTML page about the ``images`` table and its rejects.

Counts per city, perception-score distributions, and rejects by stage with a few examples each
(reason, path, and a thumbnail when the file still decodes and lies under a dump root of the
ledger).  Only reads: a missing local database is an error, never created.  Aggregates run in
Polars over LanceDB's lazy scan with only the needed columns projected, so vectors are never
loaded.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl

from schemas.tables import FILES_TABLE, IMAGES_TABLE, REJECTS_TABLE, SCORE_COLUMNS
from tasks.io.objstore import StorageConfig, is_local
from tasks.report.images import Thumb, Thumbnailer, ledger_roots, png_data_uri
from tasks.report.plots import city_counts, score_histograms
from tasks.report.templates import render

EXAMPLES_PER_STAGE = 6


class DatabaseNotFound(LookupError):
    """The database or its images table does not exist."""


def _open(db_uri: str, images_table: str, storage: StorageConfig | None):
    from tasks.io import store

    if is_local(db_uri) and not Path(db_uri.removeprefix("file://")).exists():
        raise DatabaseNotFound(f"no LanceDB at {db_uri}")
    db = store.connect(db_uri, storage)
    suffix = images_table.removeprefix(IMAGES_TABLE)
    if not images_table.startswith(IMAGES_TABLE):
        raise DatabaseNotFound(f"{images_table!r} is not an images table (images[__model])")
    tables = {}
    for kind in (IMAGES_TABLE, FILES_TABLE, REJECTS_TABLE):
        try:
            tables[kind] = db.open_table(kind + suffix)
        except ValueError:
            tables[kind] = None
    if tables[IMAGES_TABLE] is None:
        raise DatabaseNotFound(f"no table {images_table!r} in {db_uri}")
    return tables


def _examples(rejects: pl.LazyFrame, stage: str, thumbs: Thumbnailer, n: int) -> list[dict]:
    rows = (rejects.filter(pl.col("stage") == stage).sort("at", descending=True, nulls_last=True)
            .select("source_uri", "error").head(n).collect().to_dicts())
    return [r | {"thumb": Thumb(reason="a metadata row, not a file") if "#row=" in r["source_uri"]
                 else thumbs.thumb(r["source_uri"])} for r in rows]


def _stages(rejects, thumbs: Thumbnailer, n: int) -> list[dict]:
    if rejects is None or not rejects.count_rows():
        return []
    lf = rejects.to_polars()
    counts = lf.group_by("stage").len().sort("len", "stage", descending=[True, False]).collect()
    return [{"stage": s, "rows": k, "examples": _examples(lf, s, thumbs, n)}
            for s, k in counts.iter_rows()]


def _summary(db_uri: str, images, files, stages: list[dict], cities: list) -> list[tuple]:
    lf = images.to_polars()
    facts = lf.select(pl.len().alias("rows"), pl.col("run_id").n_unique().alias("runs"),
                      pl.col("ingested_at").min().alias("first"),
                      pl.col("ingested_at").max().alias("last")).collect().row(0, named=True)
    models = lf.select(pl.col("clip_model").unique().sort()).collect()["clip_model"].to_list()
    out = [("database", db_uri), ("table", f"{images.name} (version {images.version})"),
           ("images", str(facts["rows"])), ("cities", str(len(cities))),
           ("CLIP model", ", ".join(str(m) for m in models) or "–"),
           ("ingest runs", str(facts["runs"])),
           ("ingested", f"{_when(facts['first'])} … {_when(facts['last'])}" if facts["rows"]
            else "–"),
           ("rejects", str(sum(s["rows"] for s in stages)))]
    if files is not None:
        st = files.to_polars().group_by("status").len().sort("status").collect()
        out.append(("files (ledger)", ", ".join(f"{s}={n}" for s, n in st.iter_rows()) or "0"))
    return out


def _when(at) -> str:
    return at.strftime("%Y-%m-%d %H:%M:%S %Z").strip() if at is not None else "–"


def build_overview(db_uri: str, images_table: str = IMAGES_TABLE, *,
                   image_roots: list[str] | None = None, max_pixels: int = 64_000_000,
                   examples: int = EXAMPLES_PER_STAGE,
                   storage: StorageConfig | None = None) -> tuple[str, dict]:
    """(HTML, summary) of the images table ``images_table`` of ``db_uri``."""
    t = _open(db_uri, images_table, storage)
    images, files, rejects = t[IMAGES_TABLE], t[FILES_TABLE], t[REJECTS_TABLE]
    roots = [*(image_roots or []), *(ledger_roots(files.to_polars()) if files else [])]
    thumbs = Thumbnailer(roots, max_pixels, storage)
    lf = images.to_polars()
    cities = [(c, n) for c, n in lf.group_by("city").len()
              .sort("len", "city", descending=[True, False], nulls_last=True).collect().iter_rows()]
    scores = lf.select(*SCORE_COLUMNS).collect()
    stages = _stages(rejects, thumbs, examples)
    plots = [("images per city", png_data_uri(city_counts(cities, "images per city"))),
             ("perception score distributions",
              png_data_uri(score_histograms({c: scores[c].to_list() for c in SCORE_COLUMNS},
                                            "perception scores of all images")))]
    html = render("overview", title=f"mmrag overview: {images.name}", notes=[],
                  summary=_summary(db_uri, images, files, stages, cities), plots=plots,
                  cities=cities, stages=stages)
    return html, {"images": scores.height, "cities": len(cities),
                  "rejects": {s["stage"]: s["rows"] for s in stages}}
