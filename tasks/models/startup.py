"""What a CLIP process pays before its first batch, and the two parts of it that buy nothing.

Measured on a 2-core Xeon VM (one thread, ViT-B-32): ``import torch`` 1.4 s, ``import
open_clip`` 2.6-3.0 s (of which ``transformers``, imported by open_clip's Hugging Face text-tower
adapter, ~1.1 s), building the model 1.7-2.1 s, of which 1.1-1.4 s is the random
initialisation that the checkpoint then overwrites.  Every ingest pays this once per CLIP actor,
after planning, on the critical path.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import sys
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def skip_random_init() -> Iterator[None]:
    """Build modules without ``torch.nn.init``'s random fills: use it only around building a
    model whose every weight a checkpoint then sets.  open_clip loads full checkpoints with
    ``strict=True``, so a weight the checkpoint lacks fails the load instead of staying
    uninitialised.  (Hugging Face's ``no_init_weights`` does the same.)"""
    import torch

    init = torch.nn.init
    names = [n for n in vars(init) if n.endswith("_") and not n.startswith("_")]
    saved = {n: getattr(init, n) for n in names}
    for name in names:
        setattr(init, name, _keep)
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(init, name, fn)


def _keep(tensor, *args, **kwargs):
    return tensor


def config_json(model: str, config_dir: str | None) -> dict | None:
    """An open_clip model's config, read from its JSON without importing open_clip."""
    dirs = [Path(config_dir)] if config_dir else []
    found = importlib.util.find_spec("open_clip")
    if found and found.submodule_search_locations:
        dirs += [Path(p) / "model_configs" for p in found.submodule_search_locations]
    for d in dirs:
        path = d / f"{model}.json"
        if path.is_file():
            return json.loads(path.read_text())
    return None


def uses_transformers(model: str, config_dir: str | None) -> bool:
    """Whether the model needs Hugging Face ``transformers`` (an HF text tower or tokenizer);
    True when its config cannot be read (hf-hub: models, unknown names)."""
    cfg = config_json(model, config_dir)
    if cfg is None:
        return True
    text = cfg.get("text_cfg", {})
    return bool(text.get("hf_model_name") or text.get("hf_tokenizer_name"))


def without_transformers() -> None:
    """Make ``import transformers`` fail in this process, so open_clip skips its optional
    Hugging Face adapter (~1.1 s).  Only for a process that will never need it: a CLIP actor of
    a model with open_clip's own text tower and no Hugging Face caption encoder.  Once
    imported, it is left alone."""
    sys.modules.setdefault("transformers", None)
