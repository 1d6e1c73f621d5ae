"""The caption space: captions that share no word with a query, found by their meaning."""

from __future__ import annotations

import numpy as np
import pytest

from tasks.models.clip import load_clip
from tasks.models.text import load_text
from tasks.query.embed import embed_captions
from tasks.query.retrieve import pin_images, search_all
from tests.query.caption_fixtures import QUERY, pick_captions, plan, specs, write_table


def _search(db, clip, text, rows, opts=None, label=True):
    from tasks.models.clip import model_shape

    pinned = pin_images(db, model_shape(clip)[0], clip.label,
                        caption_label=text.label if label else None)
    queries = plan(rows)
    vectors = load_clip(clip).encode_texts(queries["text"].to_list())
    captions = embed_captions(queries, text)
    errors, used = {}, {}
    hits = search_all(pinned, queries, vectors, errors, opts or {}, None, captions, used)
    return pinned, hits, errors, used


@pytest.mark.parametrize("encoder", ["clip", "sentence-transformers"])
def test_caption_space_finds_paraphrases_full_text_cannot(tmp_path, cache_dir, encoder):
    clip, text = specs(cache_dir, encoder)
    relevant, others, sharing = pick_captions(text)
    assert not {w for c in relevant for w in c.split()} & set(QUERY.split())
    db = str(tmp_path / "db")
    _, ids = write_table(db, clip, text, relevant + others + sharing + [None])
    want = {ids[c] for c in relevant}
    rows = [{"text": QUERY, "mode": "caption"},
            {"text": QUERY, "mode": "hybrid"}]
    _, hits, errors, used = _search(db, clip, text, rows, {"spaces": "text"})
    assert not errors
    assert {h["image_id"] for h in hits[0]} == want
    assert all(h["spaces"] == ["caption"] and h["caption_similarity"] > 0 for h in hits[0])
    full_text = {h["image_id"] for h in hits[1]}
    assert full_text and not full_text & want, "full text matched a caption sharing no word"
    assert full_text <= {ids[c] for c in sharing}
    assert used == {0: ["caption"], 1: ["text"]}

    for fusion in ("rrf", "weighted"):
        _, fused, errors, used = _search(db, clip, text, [{"text": QUERY, "mode": "hybrid"}],
                                         {"fusion": fusion, "spaces": "caption+text",
                                          "caption_weight": 0.7, "text_weight": 0.3})
        found = {h["image_id"]: h for h in fused[0]}
        assert not errors and used[0] == ["caption", "text"]
        assert want & set(found), fusion
        assert all("caption" in found[i]["spaces"] for i in want & set(found))


def test_filters_and_all_three_spaces_apply_to_caption_vectors(tmp_path, cache_dir):
    clip, text = specs(cache_dir)
    relevant, others, sharing = pick_captions(text)
    captions = relevant + others + sharing
    cities = ["A" if i % 2 else "B" for i in range(len(captions))]
    db = str(tmp_path / "db")
    _, ids = write_table(db, clip, text, captions, cities)
    city = dict(zip(captions, cities, strict=True))
    rows = [{"text": QUERY, "mode": "caption", "where": "(city = 'A')", "top_k": 5},
            {"text": QUERY, "mode": "hybrid", "where": "(city = 'B')", "top_k": 5}]
    _, hits, errors, used = _search(db, clip, text, rows)
    assert not errors and used[1] == ["image", "caption", "text"]
    assert [h["city"] for h in hits[0]] == ["A"] * 5
    assert {h["city"] for h in hits[1]} == {"B"}
    nearest_a = [c for c in relevant + others if city[c] == "A"][:1]
    assert hits[0][0]["image_id"] == ids[nearest_a[0]]


def test_a_table_without_caption_vectors_falls_back_with_a_reason(tmp_path, cache_dir):
    clip, text = specs(cache_dir)
    db = str(tmp_path / "db")
    write_table(db, clip, text, ["avenue of trees", "a quiet road", None], old=True)
    rows = [{"text": "avenue", "mode": "hybrid"}, {"text": "avenue", "mode": "caption"}]
    pinned, hits, errors, used = _search(db, clip, text, rows)
    assert "mmrag backfill --captions" in pinned.caption_note
    assert used[0] == ["image", "text"] and hits[0]
    assert "backfill --captions" in errors[1] and 1 not in hits


def test_caption_vectors_of_another_model_are_not_searched(tmp_path, cache_dir):
    clip, text = specs(cache_dir)
    other = specs(cache_dir, "sentence-transformers")[1]
    db = str(tmp_path / "db")
    write_table(db, clip, other, ["avenue of trees", "a quiet road"])
    from tasks.models.clip import model_shape

    pinned = pin_images(db, model_shape(clip)[0], clip.label, caption_label=text.label)
    assert other.label in pinned.caption_note and text.label in pinned.caption_note


def test_ann_index_on_caption_vectors(tmp_path, cache_dir):
    from tasks.io import store

    clip, text = specs(cache_dir)
    relevant, others, sharing = pick_captions(text, n_pool=120)
    db = str(tmp_path / "db")
    images, ids = write_table(db, clip, text, relevant + others + sharing)
    tables = store.Tables(images.db if hasattr(images, "db") else None, images, images, images)
    built = store._ann_indexes(images, set(), images.count_rows(),
                               store.IndexPolicy(ann_min_rows=50))
    assert any("caption_vector" in b for b in built)
    assert tables.images.list_indices()
    _, hits, errors, _ = _search(db, clip, text, [{"text": QUERY, "mode": "caption"}],
                                 {"nprobes": 20, "refine_factor": 5})
    assert not errors and {h["image_id"] for h in hits[0]} == {ids[c] for c in relevant}


def test_query_texts_land_in_the_caption_space_of_the_encoder(cache_dir):
    _, text = specs(cache_dir, "sentence-transformers")
    queries = plan([{"text": QUERY, "mode": "hybrid"}, {"text": "x", "mode": "text"},
                    {"text": QUERY, "mode": "caption"}])
    out = embed_captions(queries, text)
    assert np.isnan(out[1]).all() and np.allclose(out[0], out[2])
    assert np.allclose(out[0], load_text(text).encode([QUERY])[0], atol=1e-5)
