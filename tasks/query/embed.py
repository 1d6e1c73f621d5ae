"""Query embedding: in the flow's process for ordinary files, in Ray CLIP actors for large ones.

A few thousand queries embed in seconds where the flow runs; a file of a million does not, so
from ``RayEmbed.min_queries`` rows on the plan is cut into blocks and embedded by a fixed pool
of CLIP actors (one model each, a GPU each when the cluster has them), like ingest's
images.  Either way the CLIP model is released before the function returns: the generation
engine that starts next (vLLM checks free GPU memory at start-up) must not find it resident,
so the process's cached model (``load_clip`` keeps one per process) is dropped as well.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass

import numpy as np
import polars as pl
import pyarrow as pa

from tasks.io.cluster import BATCH_RETRIES, quiet_ray_data
from tasks.models import clip as clip_models
from tasks.models.clip import ClipSpec, load_clip, model_shape
from tasks.models.text import TextSpec, load_text, release_text
from tasks.query.retrieve import TEXT_BATCH, embed_queries

#: modes whose text is also searched in the caption space
CAPTION_MODES = ("caption", "hybrid")


@dataclass(frozen=True)
class RayEmbed:
    """When and how query files go to Ray: ``min_queries`` rows or more (0 = never), in
    ``actors`` CLIP actors of ``actor_cpus`` each, ``rows`` queries per actor call."""

    min_queries: int = 2000
    actors: int = 2
    actor_cpus: float = 0.75
    rows: int = 256


def release_gpu() -> None:
    """Return freed CUDA memory to the device (a no-op on CPU-only machines)."""
    gc.collect()
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a base dependency
        return
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def embed_plan(plan: pl.DataFrame, spec: ClipSpec, max_pixels: int,
               ray_embed: RayEmbed | None = None) -> tuple[np.ndarray, dict[int, str]]:
    """One vector per plan row (NaN where none) and per-row errors, as ``embed_queries``."""
    if ray_embed and ray_embed.min_queries and plan.height >= ray_embed.min_queries:
        return _embed_on_ray(plan, spec, max_pixels, ray_embed)
    clip = load_clip(spec)
    try:
        return embed_queries(plan, clip, max_pixels)
    finally:
        # load_clip keeps one model per process for the stages that reuse it; here it must go
        del clip
        clip_models.load_clip.cache_clear()
        release_text()
        release_gpu()


def embed_captions(plan: pl.DataFrame, text: TextSpec) -> np.ndarray:
    """The texts of caption and hybrid rows in the caption space (NaN rows elsewhere).

    Call it before ``embed_plan``: with the CLIP text tower as caption encoder, the model
    loaded here is the one ``embed_plan`` reuses and then releases."""
    wanted = (plan["error"].is_null() & plan["text"].is_not_null()
              & plan["mode"].is_in(list(CAPTION_MODES))).to_numpy()
    idx = np.flatnonzero(wanted)
    model = load_text(text)
    out = np.full((plan.height, model.dim), np.nan, dtype=np.float32)
    texts = plan["text"].to_list()
    for start in range(0, len(idx), TEXT_BATCH):
        rows = idx[start : start + TEXT_BATCH]
        out[rows] = model.encode([texts[i] for i in rows])
    if text.encoder != "clip":
        release_text()
        release_gpu()
    return out


class QueryEmbedder:
    """Ray actor: one CLIP model; embeds a block of plan rows (``_i`` = the row's position)."""

    def __init__(self, spec: ClipSpec, max_pixels: int):
        self.clip, self.max_pixels = load_clip(spec), max_pixels

    def __call__(self, batch: pa.Table) -> pa.Table:
        plan = pl.from_arrow(batch)
        vectors, errors = embed_queries(plan, self.clip, self.max_pixels)
        flat = pa.array(vectors.ravel())
        return pa.table({
            "_i": batch["_i"],
            "vector": pa.FixedSizeListArray.from_arrays(flat, vectors.shape[1]),
            "error": pa.array([errors.get(i) for i in range(plan.height)], pa.string()),
        })


def _embed_on_ray(plan: pl.DataFrame, spec: ClipSpec, max_pixels: int,
                  opts: RayEmbed) -> tuple[np.ndarray, dict[int, str]]:
    import ray

    quiet_ray_data()
    table = plan.with_row_index("_i").with_columns(pl.col("_i").cast(pl.Int64)).to_arrow()
    blocks = [table.slice(i, opts.rows) for i in range(0, table.num_rows, opts.rows)]
    gpus = 1 if spec.device == "cuda" or (
        spec.device == "auto" and ray.cluster_resources().get("GPU", 0) >= 1) else 0
    ds = ray.data.from_arrow(blocks).map_batches(
        QueryEmbedder, fn_constructor_kwargs={"spec": spec, "max_pixels": max_pixels},
        compute=ray.data.ActorPoolStrategy(size=opts.actors), batch_size=opts.rows,
        batch_format="pyarrow", num_cpus=opts.actor_cpus, num_gpus=gpus,
        max_task_retries=BATCH_RETRIES)
    vectors = np.full((plan.height, model_shape(spec)[0]), np.nan, dtype=np.float32)
    errors: dict[int, str] = {}
    for out in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        rows = out["_i"].to_numpy()
        flat = out["vector"].combine_chunks().flatten().to_numpy(zero_copy_only=False)
        vectors[rows] = flat.reshape(len(rows), -1)
        errors.update({int(i): e for i, e in zip(rows, out["error"].to_pylist(), strict=True)
                       if e is not None})
    return vectors, errors
