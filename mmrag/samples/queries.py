"""A demo queries file for a sample dump: every mode, filters, and two bad rows on purpose."""

from __future__ import annotations

import json
from pathlib import Path


def write_sample_queries(path: str | Path, dump: str | Path) -> list[dict]:
    """Write JSONL queries that exercise text, image and hybrid retrieval on ``dump``."""
    dump, path = Path(dump), Path(path)
    images = sorted(p for p in (dump / "images").rglob("*.JPG") if p.parent.name != "bad")
    if not images:
        raise FileNotFoundError(f"no sample images under {dump / 'images'}")
    city = images[0].stem.rsplit("_", 1)[-1]
    rows = [
        {"query_id": "leafy", "text": "a tree-lined street with low houses", "top_k": 4},
        {"query_id": "safe-in-city", "text": "does this street look safe to walk at night?",
         "city": city, "min_safer": 3.0},
        {"query_id": "busy", "text": "busy traffic with many cars", "mode": "hybrid"},
        {"query_id": "lookalike", "image": str(images[0].resolve()), "top_k": 3},
        {"query_id": "lookalike-why", "image": str(images[1].resolve()),
         "text": "why do these places look alike?"},
        {"query_id": "injection", "text": "grey streets", "city": "x' OR '1'='1"},
        {"query_id": "bad-no-input"},
        {"query_id": "bad-top-k", "text": "parks", "top_k": "lots"},
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows
