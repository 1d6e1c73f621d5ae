"""``mmrag evaluate --spaces``: one variant per combination of hybrid spaces, scored as usual."""

from __future__ import annotations

import polars as pl
import pytest

from tasks.evaluate.labelled_set import QUERY_SCHEMA
from tasks.evaluate.retrieval import (
    SPACE_VARIANTS,
    caption_vectors,
    evaluate_retrieval,
    resolve_variants,
)
from tasks.models.clip import load_clip, model_shape
from tasks.query.retrieve import pin_images
from tests.query.caption_fixtures import QUERY, pick_captions, specs, write_table


def test_space_variants_score_the_caption_space(tmp_path, cache_dir):
    clip, text = specs(cache_dir)
    relevant, others, sharing = pick_captions(text)
    db = str(tmp_path / "db")
    _, ids = write_table(db, clip, text, relevant + others + sharing)
    pinned = pin_images(db, model_shape(clip)[0], clip.label, caption_label=text.label)
    queries = pl.DataFrame([{
        "query_id": "h1", "task": "hybrid", "subset": None, "city": None, "text": QUERY,
        "target": ids[relevant[0]], "relevant": [ids[relevant[0]]],
        "vector": load_clip(clip).encode_texts([QUERY])[0].tolist(), "error": None}],
        schema=QUERY_SCHEMA)
    specs_ = [f"{n}=spaces:{v}" for n, v in SPACE_VARIANTS.items()]
    variants = resolve_variants(specs_, {"spaces": "image+caption+text"})
    rows = evaluate_retrieval(pinned, queries, variants, caption_vectors(pinned, queries, text))
    mrr = {r["variant"]: r["value"] for r in rows
           if r["task"] == "hybrid" and r["metric"] == "mrr" and r["city"] is None
           and r["subset"] is None}
    assert set(mrr) == {"default", *SPACE_VARIANTS}
    assert mrr["caption_only"] == 1.0  # the nearest caption, by construction
    assert mrr["caption_only"] > mrr["image+text"]  # neither pixels nor words find it
    assert all('"spaces"' in r["search_opts"] for r in rows)


def test_a_bad_space_fails_before_any_search():
    with pytest.raises(ValueError, match="hybrid spaces"):
        resolve_variants(["x=spaces:image+pixels"], {})
