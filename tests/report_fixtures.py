"""Small report/docs inputs built without Ray or models: a sample dump, a LanceDB database
written row by row from its metadata (random vectors), hostile rejects, and answers files.

Shared by tests/test_report.py and tests/test_readme_examples.py; every value a test checks
can be recomputed from what these functions return.
"""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from schemas.answers import ANSWER_SCHEMA, RETRIEVED_TYPE
from schemas.tables import SCORE_COLUMNS, UNSUFFIXED_MODELS

DIM = 8
CLIP = "mmrag-tiny-clip/mmrag-tiny-clip-seed0.safetensors"
assert CLIP in UNSUFFIXED_MODELS
HOSTILE = '<script>alert("x")</script><img src=x onerror="alert(1)"> & "quotes"'
AT = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)


def build_db(dump: Path, db: Path, outside: Path) -> dict:
    """images/files/rejects for every JPEG of ``dump`` plus three rejects; returns the rows."""
    from tasks.io import store

    records = json.loads((dump / "metadata.json").read_text())
    rng = np.random.default_rng(7)
    images, files = [], []
    for rec in records:
        rel = rec["Relative Path"].replace("\\", "/")
        path = dump / rel
        data = path.read_bytes()
        row = {"image_id": hashlib.sha256(data).hexdigest(), "source_uri": str(path),
               "rel_path": rel, "file_name": path.name, "city": path.parent.name,
               "caption": "\n".join(rec["Caption"]), "width": 320, "height": 240,
               "clip_model": CLIP, "run_id": "ingest-1", "ingested_at": AT,
               **{c: float(rec[c.replace("_", " ")]) for c in SCORE_COLUMNS}}
        vec = rng.normal(size=DIM).astype(np.float32)
        images.append(row | {"vector": (vec / np.linalg.norm(vec)).tolist()})
        files.append({"source_uri": str(path), "rel_path": rel, "file_name": path.name,
                      "size": len(data), "mtime": 0.0, "image_id": row["image_id"],
                      "status": "ingested", "run_id": "ingest-1"})
    rejects = _rejects(dump, outside, files)
    tables = store.open_tables(str(db), DIM, CLIP)
    tables.images.add(images)
    tables.files.add(files)
    tables.rejects.add([r | {"run_id": "ingest-1", "at": AT} for r in rejects])
    return {"images": images, "files": files, "rejects": rejects}


def _rejects(dump: Path, outside: Path, files: list[dict]) -> list[dict]:
    """A truncated JPEG (decode), a symlink leaving the dump (path), a metadata row whose file
    still decodes (metadata): only that last one can have a thumbnail."""
    bad = dump / "images" / "bad"
    bad.mkdir(parents=True, exist_ok=True)
    good = Path(files[0]["source_uri"]).read_bytes()
    (bad / "truncated.jpg").write_bytes(good[: len(good) // 3])
    outside.mkdir(parents=True, exist_ok=True)
    (outside / "secret.jpg").write_bytes(good)
    link = bad / "link.jpg"
    link.unlink(missing_ok=True)
    link.symlink_to(outside / "secret.jpg")
    (bad / "scores.jpg").write_bytes(Path(files[1]["source_uri"]).read_bytes())
    rows = [("truncated.jpg", "decode", "corrupt or truncated image: broken data stream"),
            ("link.jpg", "path", "symlink resolves outside the dump"),
            ("scores.jpg", "metadata", f"score 'safer' is not a number: {HOSTILE}")]
    for name in ("truncated.jpg", "link.jpg", "scores.jpg"):
        files.append({"source_uri": str(bad / name), "rel_path": f"images/bad/{name}",
                      "file_name": name, "size": 1, "mtime": 0.0, "image_id": None,
                      "status": "rejected", "run_id": "ingest-1"})
    return [{"source_uri": str(bad / n), "file_name": n, "stage": s, "error": e}
            for n, s, e in rows]


def hit(image: dict, rank: int, similarity: float, **extra) -> dict:
    fields = [f.name for f in RETRIEVED_TYPE]
    return {k: image.get(k) for k in fields} | {"rank": rank, "similarity": similarity,
                                                "score": similarity} | extra


def run_rows(images: list[dict], query_image: str, run_id: str = "r1") -> list[dict]:
    """Four queries: cited answer with boxes, image query with a query-image box and an empty
    answer, a bad row, and hostile text with a hit whose file no longer matches its hash."""
    base = {"run_id": run_id, "db": "db", "images_table": "images", "table_version": 3,
            "clip_model": CLIP, "generator": "transformers", "generator_model": "tiny-llava",
            "created_at": AT, "retrieval_ms": 12.5, "generation_ms": 40.0}
    h1 = [hit(images[i], r, 0.9 - 0.1 * r) for r, i in enumerate((0, 1, 2, 3), 1)]
    h2 = [hit(images[i], r, 0.8 - 0.1 * r) for r, i in enumerate((4, 5, 0), 1)]
    h4 = [hit(images[6], 1, 0.5), hit(images[7], 2, 0.4, caption=HOSTILE, city=HOSTILE),
          hit(images[8], 3, 0.3, image_id="0" * 64)]
    return [
        base | {"query_id": "leafy", "query_text": "a tree-lined street?", "mode": "text",
                "top_k": 4, "retrieved": h1, "answer": "Leafy [1] and quiet [3].",
                "citations": [1, 3],
                "boxes": [{"image_id": h1[0]["image_id"], "rank": 1, "x1": 0.1, "y1": 0.2,
                           "x2": 0.5, "y2": 0.6},
                          {"image_id": None, "rank": 3, "x1": 0.5, "y1": 0.5, "x2": 1.0,
                           "y2": 1.0}]},
        base | {"query_id": "lookalike", "query_image": query_image, "mode": "image",
                "top_k": 3, "retrieved": h2, "answer": "", "citations": [],
                "boxes": [{"image_id": None, "rank": None, "x1": 0.25, "y1": 0.25, "x2": 0.75,
                           "y2": 0.75},
                          {"image_id": "nope", "rank": 9, "x1": 0.0, "y1": 0.0, "x2": 0.5,
                           "y2": 0.5}]},
        base | {"query_id": "bad-no-input", "mode": None, "error": "row has no text and no image",
                "error_stage": "query"},
        base | {"query_id": "hostile", "query_text": HOSTILE, "mode": "hybrid", "top_k": 3,
                "retrieved": h4, "answer": f"{HOSTILE} see [2] and [7]", "citations": [2],
                "boxes": [{"image_id": None, "rank": 3, "x1": 0.1, "y1": 0.1, "x2": 0.9,
                           "y2": 0.9}]},  # on the hit whose thumbnail cannot be shown
    ]


def write_v1(rows: list[dict], out: Path, run_date: str, run_id: str) -> Path:
    """An answers file as schema version 1 wrote it: no boxes, raw_answer, search_options."""
    v2_only = {"boxes", "raw_answer", "search_options"}
    schema = pa.schema([f for f in ANSWER_SCHEMA if f.name not in v2_only],
                       metadata={"mmrag.schema_version": "1", "mmrag.table": "answers"})
    rows = [{k: v for k, v in r.items() if k not in v2_only} | {"run_id": run_id} for r in rows]
    path = out / "answers" / f"run_date={run_date}" / f"{run_id}.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    return path
