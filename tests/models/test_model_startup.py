"""What a CLIP process skips at start-up: random init under a strict checkpoint load, and the
``transformers`` import in actors that never use it."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import open_clip
import pytest
import torch
from safetensors.torch import load_file, save_file

from tasks.ingest.pipeline import needs_transformers
from tasks.models.clip import Clip, ClipSpec, resolve_spec
from tasks.models.startup import skip_random_init, uses_transformers
from tasks.models.text import TextSpec


@pytest.fixture(scope="module")
def spec(cache_dir):
    return resolve_spec("mmrag-tiny-clip", "tiny", str(cache_dir), precision="fp32")


def test_vectors_equal_open_clips_own_load(spec):
    """Skipping the random fill changes nothing: the checkpoint sets every weight."""
    open_clip.add_model_config(spec.config_dir)
    ref, _, _ = open_clip.create_model_and_transforms(spec.model, pretrained=spec.pretrained)
    ours = Clip(spec)
    for name, value in ref.state_dict().items():
        assert torch.equal(value, ours.model.state_dict()[name]), name
    pixels = np.random.default_rng(0).integers(0, 256, (3, ours.input_size, ours.input_size, 3),
                                               dtype=np.uint8)
    assert np.isfinite(ours.encode_pixels(pixels)).all()


def test_a_checkpoint_missing_a_weight_fails_instead_of_leaving_it_unset(spec, tmp_path):
    weights = load_file(spec.pretrained)
    weights.pop(next(k for k in weights if k.startswith("visual.")))
    partial = tmp_path / "partial.safetensors"
    save_file(weights, str(partial))
    with pytest.raises(RuntimeError, match="Missing key"):
        Clip(ClipSpec(spec.model, str(partial), spec.config_dir, "fp32"))


def test_init_functions_come_back_after_the_block():
    before = torch.nn.init.normal_
    with skip_random_init():
        untouched = torch.nn.init.normal_(torch.zeros(3))
        assert torch.nn.init.normal_ is not before
    assert torch.nn.init.normal_ is before and torch.equal(untouched, torch.zeros(3))
    assert torch.nn.init.normal_(torch.zeros(1000)).std() > 0.5


def test_which_models_need_transformers(spec):
    assert not uses_transformers("ViT-B-32", None)
    assert uses_transformers("mt5-base-ViT-B-32", None)
    assert uses_transformers("hf-hub:someone/some-model", None)
    assert not needs_transformers(spec, None)
    assert not needs_transformers(spec, TextSpec("clip", spec))
    assert needs_transformers(spec, TextSpec("sentence-transformers", spec, "/models/st"))


def test_a_clip_actor_embeds_without_importing_transformers(spec):
    """In a fresh process, as in a Ray actor: the embedder works and transformers was never
    loaded."""
    code = f"""
import sys, numpy as np
from tasks.ingest.pipeline import ClipEmbedder
from tasks.models.clip import ClipSpec
from tasks.models.text import TextSpec
spec = ClipSpec(*{(spec.model, spec.pretrained, spec.config_dir, "fp32")!r})
actor = ClipEmbedder(spec, threads=1, text=TextSpec("clip", spec))
n = actor.clip.input_size
out = actor({{"pixels": np.zeros((2, n, n, 3), np.uint8), "stage": np.array(["", ""], object),
             "error": np.array(["", ""], object), "caption": np.array(["a street", None], object)}})
assert np.isfinite(out["vector"]).all() and not np.isnan(out["caption_vector"][0]).any()
print("transformers loaded:", sys.modules.get("transformers") is not None)
"""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, check=False)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "transformers loaded: False" in run.stdout
