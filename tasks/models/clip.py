"""Loading CLIP through open_clip, and embedding batches of pixels or texts.

The ``tiny`` profile builds a small random-weight model once (deterministic seed, cached as a
config + safetensors checkpoint) and loads it through exactly the code path real weights use:
``create_model_and_transforms(name, pretrained=<tag or checkpoint path>)``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np

from tasks.io import atomic
from tasks.models.precision import cpu_has_bf16, pick_dtype  # noqa: F401 - the API
from tasks.models.startup import config_json, skip_random_init

log = logging.getLogger(__name__)

TINY_NAME = "mmrag-tiny-clip"
TINY_CONFIG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "head_width": 32, "patch_size": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
#: texts per text-tower call, sorted by length so each call stops at its own longest text
_TEXT_CHUNK = 32
TINY_WARNING = (
    "profile 'tiny': the CLIP model has random weights - its vectors are meaningless; "
    "use it for smoke runs and tests only"
)


@dataclass(frozen=True)
class ClipSpec:
    """Everything a worker needs to build the same model (small, picklable, hashable)."""

    model: str
    pretrained: str
    config_dir: str | None = None
    precision: str = "auto"
    device: str = "auto"
    scales: tuple[float, ...] = (1.0,)

    @property
    def label(self) -> str:
        """Stored in tables: model name + tag, or checkpoint file name (not machine-specific).

        Multi-scale vectors differ from single-scale ones, so the scales are part of the label
        (and hence of the table-set suffix): the two never mix in one table.  So is int8: its
        vectors move further from fp32 ones than bf16's do (measured, docs/performance.md)."""
        tag = self.pretrained
        if os.sep in tag or tag.endswith((".pt", ".bin", ".safetensors")):
            tag = Path(tag).name
        multi = "" if self.scales == (1.0,) else "@ms" + "+".join(f"{z:g}" for z in self.scales)
        int8 = "@int8" if self.precision == "int8" else ""
        return f"{self.model}/{tag}{multi}{int8}"


def ensure_tiny_clip(cache_dir: str | Path, seed: int = 0) -> tuple[str, str]:
    """Build the tiny model once: (config dir for open_clip, checkpoint path). Atomic writes.

    Imports torch/open_clip (~10 s on 2 cores) only when it has to build: a no-op ingest must
    not pay for them."""
    root = Path(cache_dir) / "tiny-clip-v1"
    cfg_path, ckpt = root / f"{TINY_NAME}.json", root / f"{TINY_NAME}-seed{seed}.safetensors"
    root.mkdir(parents=True, exist_ok=True)
    if not cfg_path.exists():
        atomic.write_bytes(cfg_path, json.dumps(TINY_CONFIG, indent=1).encode())
    if not ckpt.exists():
        import open_clip
        import torch
        from safetensors.torch import save_file

        open_clip.add_model_config(str(root))
        torch.manual_seed(seed)
        with _expected_random_init():
            model = open_clip.create_model(TINY_NAME, pretrained=None)
        with atomic.atomic_path(ckpt) as tmp:
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
    return str(root), str(ckpt)


@contextmanager
def _expected_random_init() -> Iterator[None]:
    """open_clip warns (on the root logger) that a model without weights is random: building
    the tiny checkpoint, that is the point."""
    def drop(record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No pretrained weights loaded")

    root = logging.getLogger()
    root.addFilter(drop)
    try:
        yield
    finally:
        root.removeFilter(drop)


def resolve_spec(model: str, pretrained: str, cache_dir: str, precision: str = "auto",
                 scales: tuple[float, ...] | list[float] = (1.0,)) -> ClipSpec:
    """Turn settings into a spec; ``pretrained='tiny'`` builds (or reuses) the tiny checkpoint."""
    config_dir = None
    if pretrained == "tiny":
        config_dir, pretrained = ensure_tiny_clip(cache_dir)
    elif model == TINY_NAME:  # another tiny checkpoint: Ray actors need the config dir too
        config_dir = ensure_tiny_clip(cache_dir)[0]
    return ClipSpec(model, pretrained, config_dir, precision, scales=check_scales(scales))


def check_scales(scales: tuple[float, ...] | list[float]) -> tuple[float, ...]:
    """Zoom factors: 1 = the whole centre crop, 2 = its central half, …; 1 must be included."""
    out = tuple(sorted({float(z) for z in scales}))
    if not out or out[0] != 1.0 or out[-1] > 4.0 or len(out) > 4:
        raise ValueError(f"clip scales {list(scales)}: need 1.0 plus up to 3 zooms in (1, 4]")
    return out


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


class Clip:
    """A loaded model plus what batching needs: input size, normalisation, dtype."""

    def __init__(self, spec: ClipSpec):
        import open_clip
        import torch

        if spec.config_dir:
            open_clip.add_model_config(spec.config_dir)
        self.device = _device() if spec.device == "auto" else spec.device
        with skip_random_init() if spec.pretrained else contextlib.nullcontext():
            model, _, preprocess = open_clip.create_model_and_transforms(
                spec.model, pretrained=spec.pretrained, device=self.device
            )
        self.spec, self.dtype = spec, pick_dtype(spec.precision, self.device)
        self.model = model.to(self.dtype).eval()
        if spec.precision == "int8":
            self.model.visual = quantize_int8(self.model.visual)
        self.tokenizer = open_clip.get_tokenizer(spec.model)
        size = model.visual.image_size
        self.image_size = int(size[0] if isinstance(size, tuple | list) else size)
        self.input_size = input_size(self.image_size, spec.scales)
        mean, std = _norm_from(preprocess)
        self._mean = torch.tensor(mean, device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(std, device=self.device).view(1, 3, 1, 1)
        self.dim = int(self.encode_texts(["x"]).shape[1])

    def encode_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 (N, S, S, 3) centre-cropped RGB → L2-normalised float32 (N, dim).

        With several scales, S is ``input_size`` and each zoom's centre view is resized to the
        model's size; the views' unit vectors are averaged (then renormalised)."""
        import torch

        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(pixels)).to(self.device)
            x = x.permute(0, 3, 1, 2).float().div_(255.0)
            pooled = sum(self._encode(view) for view in self._views(x))
            return _normalise(pooled)

    def _views(self, x):
        import torch.nn.functional as F  # noqa: N812

        side = x.shape[-1]
        for zoom in self.spec.scales:
            crop = max(1, round(side / zoom))
            top = (side - crop) // 2
            view = x[..., top : top + crop, top : top + crop]
            if crop != self.image_size:
                view = F.interpolate(view, size=(self.image_size, self.image_size),
                                     mode="bicubic", antialias=True, align_corners=False)
            yield view

    def _encode(self, x):
        import torch

        x = ((x - self._mean) / self._std).to(self.dtype)
        return torch.nn.functional.normalize(self.model.encode_image(x).float(), dim=-1)

    def encode_texts(self, texts: list[str]) -> np.ndarray:
        """Texts → L2-normalised float32 (N, dim); sorted by length into chunks so each text
        tower call stops at its own longest text (``encode_text_trimmed``)."""
        import torch

        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        with torch.inference_mode():
            tokens = self.tokenizer(texts).to(self.device)
            order = tokens.argmax(dim=-1).argsort()
            parts = [encode_text_trimmed(self.model, tokens[idx]).float()
                     for idx in order.split(_TEXT_CHUNK)]
            out = torch.empty((len(texts), parts[0].shape[1]), device=self.device)
            out[order] = torch.cat(parts)
            return _normalise(out)


def encode_text_trimmed(model, tokens):
    """``model.encode_text`` over the batch's longest caption instead of all 77 positions.

    CLIP's text tower is causal and pools at the end-of-text token (the largest id), so the
    positions after it never reach the result: cutting them gives the same vector (to float
    rounding) at a fraction of the cost (captions are ~10–30 tokens): what keeps caption vectors
    inside the ingest's CLIP budget.  Other text towers (non-causal, other pooling) run as is."""
    import torch
    from open_clip.transformer import text_global_pool

    mask = getattr(model, "attn_mask", None)
    if getattr(model, "text_pool_type", None) != "argmax" or mask is None \
            or not hasattr(model, "token_embedding"):
        return model.encode_text(tokens)
    n = int(tokens.argmax(dim=-1).max()) + 1
    tokens = tokens[:, :n]
    cast = model.transformer.get_cast_dtype()
    x = model.token_embedding(tokens).to(cast) + model.positional_embedding[:n].to(cast)
    x = model.ln_final(model.transformer(x, attn_mask=mask[:n, :n]))
    x = text_global_pool(x, tokens, "argmax")
    proj = model.text_projection
    if proj is None:
        return x
    return proj(x) if isinstance(proj, torch.nn.Linear) else x @ proj


def quantize_int8(module):
    """Dynamic int8 quantisation of the linear layers (weights int8, activations quantised per
    batch): the MLPs, about two thirds of a ViT's FLOPs (torch leaves the attention's own
    projections in fp32).  torch's eager
    quantisation API announces its own deprecation on every call; it is still the one that runs
    without extra packages, so those notices are silenced here and nowhere else."""
    import warnings

    import torch
    from torch.ao.quantization import quantize_dynamic

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.ao\.quantization is deprecated")
        warnings.filterwarnings("ignore", message=r".*quantize_per_tensor.*deprecated")
        return quantize_dynamic(module, {torch.nn.Linear}, dtype=torch.qint8)


def _normalise(feats) -> np.ndarray:
    import torch

    feats = torch.nn.functional.normalize(feats.float(), dim=-1)
    return feats.cpu().numpy().astype(np.float32)


def _norm_from(preprocess) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The mean/std open_clip chose for this model (its Normalize transform)."""
    for t in getattr(preprocess, "transforms", []):
        if hasattr(t, "mean") and hasattr(t, "std"):
            return tuple(t.mean), tuple(t.std)
    raise ValueError("open_clip preprocess has no Normalize transform")


@cache
def load_clip(spec: ClipSpec) -> Clip:
    """One model per process (Ray actors call this once in their constructor)."""
    return Clip(spec)


def input_size(image_size: int, scales: tuple[float, ...]) -> int:
    """Pixels decoded per side: enough that the largest zoom still sees native resolution."""
    return math.ceil(image_size * max(scales))


def model_shape(spec: ClipSpec) -> tuple[int, int]:
    """(embedding width, decode size) from the model config, without building the model, and
    without importing open_clip when the config JSON can be read directly.  The decode size is
    the model's input size, times the largest zoom for multi-scale specs."""
    cfg = config_json(spec.model, spec.config_dir)
    if cfg is None:
        import open_clip

        if spec.config_dir:
            open_clip.add_model_config(spec.config_dir)
        cfg = open_clip.get_model_config(spec.model)
    if cfg is None:
        raise ValueError(f"unknown open_clip model {spec.model!r}")
    size = cfg["vision_cfg"].get("image_size", 224)
    size = int(size[0] if isinstance(size, list | tuple) else size)
    return int(cfg["embed_dim"]), input_size(size, spec.scales)
