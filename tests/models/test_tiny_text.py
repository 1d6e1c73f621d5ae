"""The tiny sentence-transformer is the same model wherever it is built (tests pick captions by
its vectors, so a machine-dependent tokenizer would make them pass here and fail there)."""

from __future__ import annotations

from pathlib import Path

from tasks.models.tiny_text import ensure_tiny_text


def test_two_builds_are_byte_identical(tmp_path):
    first = Path(ensure_tiny_text(str(tmp_path / "a")))
    second = Path(ensure_tiny_text(str(tmp_path / "b")))
    for name in ("tokenizer.json", "model.safetensors", "modules.json"):
        assert (first / name).read_bytes() == (second / name).read_bytes(), name


def test_every_word_has_its_own_token_and_unknown_words_spell_out(tmp_path):
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(ensure_tiny_text(str(tmp_path)), device="cpu")
    tokens = model.tokenizer.tokenize("Leafy avenue zzq")
    assert tokens[:2] == ["leafy", "avenue"] and "[UNK]" not in tokens
