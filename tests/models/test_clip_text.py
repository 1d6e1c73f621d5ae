"""CLIP's text tower over the batch's longest text gives the full 77-position vectors."""

from __future__ import annotations

import numpy as np
import torch

from tasks.models.clip import ClipSpec, encode_text_trimmed, load_clip, resolve_spec


def test_trimmed_text_encoding_equals_the_full_one(cache_dir):
    base = resolve_spec("mmrag-tiny-clip", "tiny", str(cache_dir))
    clip = load_clip(ClipSpec(base.model, base.pretrained, base.config_dir, "fp32"))
    texts = ["a leafy avenue", "tree lined street with parked cars near the old church " * 3,
             "x", ""]
    tokens = clip.tokenizer(texts)
    with torch.inference_mode():
        full = clip.model.encode_text(tokens).numpy()
        short = encode_text_trimmed(clip.model, tokens).numpy()
    assert int(tokens.argmax(dim=-1).max()) + 1 < tokens.shape[1]  # it did cut positions
    np.testing.assert_allclose(short, full, atol=1e-5)


def test_length_sorted_chunks_keep_each_text_in_its_row(cache_dir):
    base = resolve_spec("mmrag-tiny-clip", "tiny", str(cache_dir))
    clip = load_clip(ClipSpec(base.model, base.pretrained, base.config_dir, "fp32"))
    texts = [("street " * (i % 9 + 1)).strip() + f" {i}" for i in range(70)]
    together = clip.encode_texts(texts)
    alone = np.concatenate([clip.encode_texts([t]) for t in texts])
    np.testing.assert_allclose(together, alone, atol=1e-5)
    assert clip.encode_texts([]).shape == (0, clip.dim)
