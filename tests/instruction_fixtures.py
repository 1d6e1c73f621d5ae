"""An ``images`` table written directly (no Ray, no CLIP): real image files, known metadata.

Instruction export and fine-tuning only read the table's metadata columns and the files its
``source_uri`` points at, so building the rows here keeps those tests fast while the table
itself is the real contract (``schemas.tables.images_schema``) in a real LanceDB.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from pathlib import Path

import lancedb
import numpy as np
import pyarrow as pa
from PIL import Image

from schemas.tables import SCORE_COLUMNS, images_schema

DIM = 8
CITIES = ("Paris", "Lagos", "Lima", None)


def make_rows(dump: Path, start: int, n: int) -> list[dict]:
    """``n`` distinct JPEGs under ``dump`` and their rows; some fields null on purpose."""
    rng = np.random.default_rng(start)
    rows = []
    for i in range(start, start + n):
        rel = f"city{i % 3}/img_{i:04d}.jpg"
        path = dump / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(path, "JPEG")
        data = path.read_bytes()
        scores = {c: (None if (i + k) % 7 == 0 else float(np.float32(rng.uniform(0, 10))))
                  for k, c in enumerate(SCORE_COLUMNS)}
        rows.append({
            "image_id": hashlib.sha256(data).hexdigest(), "source_uri": str(path),
            "rel_path": rel, "file_name": path.name, "city": CITIES[i % len(CITIES)],
            "lat": None, "lon": None, "place_id": None,
            "caption": None if i % 5 == 4 else f"A street scene number {i}.\nSecond caption {i}.",
            **scores, "width": 32, "height": 24, "clip_model": "test/model", "run_id": "r",
            "ingested_at": datetime.now(UTC), "vector": rng.normal(size=DIM).astype(np.float32),
        })
    return rows


def write_table(db: str, rows: list[dict], name: str = "images") -> None:
    """Create or append to the table with exactly the ingest's schema."""
    conn = lancedb.connect(db)
    schema = images_schema(DIM)
    table = pa.Table.from_pylist(rows, schema=schema)
    try:
        conn.open_table(name).add(table)
    except ValueError:  # no such table yet
        conn.create_table(name, data=table, schema=schema)
