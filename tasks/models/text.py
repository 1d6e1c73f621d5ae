"""Caption text encoders: the model that puts captions (and text queries) in the caption space.

By default captions are embedded by the CLIP text tower of the table's own model: the space text
queries already live in, so no new weights are needed.  A sentence-transformer (the Place Pulse
tutorial's ``BAAI/bge-small-en-v1.5``) is a setting away.  Encoders are picked from a registry of
import paths, as the generation engines are (``tasks.models.engines``), so choosing CLIP never
imports sentence-transformers.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Protocol

import numpy as np

from tasks.models.clip import ClipSpec, load_clip, model_shape

#: encoder name → "module:class"; each class takes a ``TextSpec``
TEXT_ENCODERS: dict[str, str] = {
    "clip": "tasks.models.text:ClipText",
    "sentence-transformers": "tasks.models.text:SentenceText",
}
ST_MISSING = ("caption encoder 'sentence-transformers' needs the package: "
              "pip install 'mmrag[text]'")


@dataclass(frozen=True)
class TextSpec:
    """What a worker needs to build the caption encoder (small, picklable, hashable).

    ``model``: a sentence-transformers id or local folder (unused by ``clip``, which embeds with
    the table's CLIP model, ``clip``)."""

    encoder: str
    clip: ClipSpec
    model: str | None = None
    device: str = "auto"

    @property
    def label(self) -> str:
        """Stored beside each caption vector (``caption_model``): vectors of two labels never
        share a search."""
        if self.encoder == "clip":
            return f"clip:{self.clip.label}"
        name = self.model or ""
        if Path(name).is_absolute():
            name = Path(name).name
        return f"{self.encoder}:{name}"


class TextModel(Protocol):
    dim: int

    def encode(self, texts: list[str]) -> np.ndarray: ...


class ClipText:
    """The CLIP text tower of the table's model (the process's cached CLIP: an ingest actor
    embeds images and captions with one model)."""

    def __init__(self, spec: TextSpec):
        self.clip = load_clip(spec.clip)
        self.dim = self.clip.dim

    def encode(self, texts: list[str]) -> np.ndarray:
        return self.clip.encode_texts(texts)


class SentenceText:
    """A sentence-transformers model, loaded from a hub id or a local folder (the tiny
    random-weight one of ``tasks.models.tiny_text`` goes the same way)."""

    def __init__(self, spec: TextSpec):
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError as e:
            raise ImportError(ST_MISSING) from e
        import torch

        device = spec.device if spec.device != "auto" else (
            "cuda" if torch.cuda.is_available() else "cpu")
        self.model = SentenceTransformer(spec.model, device=device)
        self.dim = int(self.model.get_embedding_dimension())

    def encode(self, texts: list[str]) -> np.ndarray:
        out = self.model.encode(texts, batch_size=64, normalize_embeddings=True,
                                convert_to_numpy=True, show_progress_bar=False)
        return np.asarray(out, dtype=np.float32)


def resolve_text(encoder: str, model: str | None, clip: ClipSpec,
                 cache_dir: str) -> TextSpec | None:
    """Settings → spec; ``none`` → None (no caption vectors); ``tiny`` builds the tiny
    random-weight sentence-transformer once.  An unknown encoder names the valid ones."""
    if encoder == "none":
        return None
    if encoder not in TEXT_ENCODERS:
        raise ValueError(f"unknown caption encoder {encoder!r}; choose one of: none, "
                         + ", ".join(sorted(TEXT_ENCODERS)))
    if model == "tiny":
        from tasks.models.tiny_text import ensure_tiny_text

        model = ensure_tiny_text(cache_dir)
    return TextSpec(encoder, clip, model if encoder != "clip" else None, clip.device)


@cache
def load_text(spec: TextSpec) -> TextModel:
    """One encoder per process, built from the registry."""
    module, cls = TEXT_ENCODERS[spec.encoder].split(":")
    return getattr(importlib.import_module(module), cls)(spec)


def text_dim(spec: TextSpec) -> int:
    """Caption vector width: the CLIP width without loading CLIP, else the loaded model's."""
    if spec.encoder == "clip":
        return model_shape(spec.clip)[0]
    return load_text(spec).dim


def release_text() -> None:
    """Drop the process's cached encoders (a query run frees memory before generation)."""
    load_text.cache_clear()
