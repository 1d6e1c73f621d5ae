"""The Ray Data pipeline: read + decode in CPU tasks, CLIP in an actor pool, streamed back.

Heavy objects are built once per actor (``load_clip`` in the constructor).  Rows that failed to
decode travel on with their ``stage``/``error`` so the driver can record them; nothing is
dropped.  Only paths and small metadata go in; vectors come out, pixels never leave Ray.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import pyarrow as pa

from tasks.io.cluster import BATCH_RETRIES, quiet_ray_data
from tasks.io.images import decode_batch
from tasks.models.clip import ClipSpec, load_clip
from tasks.models.startup import uses_transformers, without_transformers
from tasks.models.text import TextSpec, load_text

log = logging.getLogger(__name__)


class PipelineError(RuntimeError):
    """The Ray pipeline gave up (a batch kept killing its worker); committed chunks are kept."""


class ClipEmbedder:
    """Actor: holds one CLIP model (and the caption encoder, by default CLIP's own text tower);
    embeds the rows that decoded and their captions, passes the others through."""

    def __init__(self, spec: ClipSpec, threads: int | None = None, text: TextSpec | None = None):
        if not needs_transformers(spec, text):
            without_transformers()
        import torch

        if threads:
            torch.set_num_threads(threads)
        self.clip = load_clip(spec)
        self.text = load_text(text) if text else None
        self.text_label = text.label if text else ""

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        pixels = batch.pop("pixels")
        ok = np.asarray(batch["stage"]) == ""
        vectors = np.zeros((len(ok), self.clip.dim), dtype=np.float32)
        if ok.any():
            try:
                vectors[ok] = self.clip.encode_pixels(pixels[ok])
            except Exception as e:  # noqa: BLE001 - the batch is recorded, the run goes on
                batch["stage"] = np.where(ok, "embed", batch["stage"]).astype(object)
                batch["error"] = np.where(ok, f"embedding failed: {e}", batch["error"])
        batch["vector"] = vectors
        if self.text is not None:
            captions = self.captions(batch, np.asarray(batch["stage"]) == "")
            batch["caption_vector"] = captions
            batch["caption_model"] = np.where(np.isnan(captions[:, 0]), "",
                                              self.text_label).astype(object)
        return batch

    def captions(self, batch: dict[str, np.ndarray], ok: np.ndarray) -> np.ndarray:
        """(N, width) caption vectors, NaN rows where there is none: no caption, a failed
        row, or a caption batch that failed (the images still land; a caption refresh
        embeds it later, see ``tasks.ingest.captions``)."""
        out = np.full((len(ok), self.text.dim), np.nan, dtype=np.float32)
        texts = batch.get("caption", np.full(len(ok), None, dtype=object))
        rows = [i for i in np.flatnonzero(ok) if isinstance(texts[i], str) and texts[i].strip()]
        if rows:
            try:
                out[rows] = self.text.encode([texts[i] for i in rows])
            except Exception:  # noqa: BLE001 - captions are refreshed later; images go on
                log.exception("caption batch failed; its captions stay unembedded")
        return out


def needs_transformers(spec: ClipSpec, text: TextSpec | None) -> bool:
    """Whether a CLIP actor for SPEC (and caption encoder TEXT) needs Hugging Face
    ``transformers``: an HF text tower, or a caption encoder other than CLIP's own."""
    return (text is not None and text.encoder != "clip") or uses_transformers(spec.model,
                                                                            spec.config_dir)


@dataclass(frozen=True)
class Layout:
    """How many CLIP actors, rows per decode task and rows per input block, for N rows."""

    actors: int
    decode_rows: int
    block: int

    @classmethod
    def of(cls, rows: int, actors: int, batch_size: int, decode_batch_size: int) -> Layout:
        # no more CLIP actors than model batches: each actor pays a model load at start-up
        actors = max(1, min(actors, -(-rows // batch_size)))
        decode_rows = max(1, min(decode_batch_size, -(-rows // actors)))
        return cls(actors, decode_rows, max(decode_rows, min(64, -(-rows // actors))))


def embed_files(todo: pa.Table, spec: ClipSpec, **opts) -> Iterator[pa.Table]:
    """Stream ``todo`` rows back as Arrow tables with image_id/width/height/stage/error/vector
    (and ``caption_vector`` when a caption encoder ``text`` is given).  ``opts``: see
    ``_embedded``; ``storage`` (endpoint, region, driver credentials) is shipped to the decode
    tasks."""
    import ray

    if todo.num_rows == 0:
        return
    layout = Layout.of(todo.num_rows, opts["actors"], opts["batch_size"],
                       opts["decode_batch_size"])
    blocks = [todo.slice(i, layout.block) for i in range(0, todo.num_rows, layout.block)]
    yield from _embedded(ray.data.from_arrow(blocks), layout, spec, **opts)


def embed_when_planned(handoff: str, expected: int, spec: ClipSpec, *, wait_s: float,
                       **opts) -> Iterator[pa.Table]:
    """The same pipeline, started before its plan exists, so that the CLIP actors load while
    the flow plans: each decode task reads its rows from the plan file at ``handoff`` once it
    appears (``expected`` ≥ its rows: the new files the ledger does not know).  A file
    ``handoff + ".cancel"`` ends it with no rows; ``wait_s`` bounds the wait.

    Reading is part of the decode tasks, not a stage of its own: on 2 cores the CLIP actors
    leave room for one task at a time, and Ray Data splits what is left between task stages,
    so a separate read stage and the decode stage could each get too little to run one task."""
    import ray

    layout = Layout.of(max(1, expected), opts["actors"], opts["batch_size"],
                       opts["decode_batch_size"])
    shards = -(-max(1, expected) // layout.block)
    read = partial(read_and_decode, handoff=handoff, block=layout.block, wait_s=wait_s,
                   decode=_decoder(opts))
    # one block per shard, made in the driver like ``embed_files``'s blocks: ``ray.data.range``
    # would add read tasks of 1 CPU each, which never find room beside 2 actors on 2 cores
    ds = ray.data.from_arrow([pa.table({"id": [i]}) for i in range(shards)])
    yield from _embedded(ds, Layout(layout.actors, 1, layout.block), spec, decode=read, **opts)


def read_and_decode(batch: dict[str, np.ndarray], handoff: str, block: int, wait_s: float,
                    decode) -> dict:
    """Ray Data task: decode rows ``[i * block, (i + 1) * block)`` of the plan at ``handoff``."""
    rows = read_plan_shard(batch, handoff, block, wait_s)
    if not rows.num_columns:
        return decode({"source_uri": np.array([], dtype=object)})
    return decode({name: rows.column(name).to_numpy(zero_copy_only=False)
                   for name in rows.column_names})


def read_plan_shard(batch: dict[str, np.ndarray], handoff: str, block: int,
                    wait_s: float) -> pa.Table:
    """Rows ``[i * block, (i + 1) * block)`` of the plan (without ``escape``, as the driver
    passes them), once the plan is at ``handoff``; no rows (no columns) when cancelled."""
    import polars as pl

    path, cancel = Path(handoff), Path(handoff + ".cancel")
    deadline = time.monotonic() + wait_s
    while not path.exists():
        if cancel.exists():
            return pa.table({})
        if time.monotonic() > deadline:
            raise TimeoutError(f"no plan at {handoff} after {wait_s:.0f} s")
        time.sleep(0.05)
    plan = pl.read_parquet(path).drop("escape", strict=False).to_arrow()
    return plan.slice(int(batch["id"][0]) * block, block)


def _decoder(opts: dict):
    return partial(decode_batch, size=opts["image_size"], max_pixels=opts["max_pixels"],
                   storage=opts.get("storage"), reduced=opts.get("reduced_decode", True))


def _embedded(ds, layout: Layout, spec: ClipSpec, *, batch_size: int, actor_cpus: float,
              decode_cpus: float, out_rows: int, threads: int | None = None,
              text: TextSpec | None = None, decode=None, **opts) -> Iterator[pa.Table]:
    """Decode tasks (``decode``, default ``decode_batch`` over ``ds``'s rows), then the CLIP
    actor pool."""
    import ray

    quiet_ray_data()
    gpus = 1 if spec.device == "cuda" or (
        spec.device == "auto" and ray.cluster_resources().get("GPU", 0) >= 1) else 0
    ds = ds.map_batches(
        decode or _decoder(opts), batch_size=layout.decode_rows, batch_format="numpy",
        num_cpus=decode_cpus, max_retries=BATCH_RETRIES,
    )
    ds = ds.map_batches(
        ClipEmbedder, fn_constructor_kwargs={"spec": spec, "text": text,
                                             "threads": threads or _threads(actor_cpus)},
        compute=ray.data.ActorPoolStrategy(size=layout.actors), batch_size=batch_size,
        batch_format="numpy", num_cpus=actor_cpus, num_gpus=gpus, max_task_retries=BATCH_RETRIES,
    )
    try:
        yield from ds.iter_batches(batch_size=out_rows, batch_format="pyarrow")
    except ray.exceptions.RayError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PipelineError(
            f"the Ray pipeline stopped ({type(e).__name__}: {first}); a decode worker or CLIP "
            f"actor died on the same batch {BATCH_RETRIES + 1} times (out of memory, or an "
            "input that crashes it?). Committed rows are kept: fix the cause and re-run"
        ) from e


def _threads(actor_cpus: float) -> int:
    return max(1, int(round(actor_cpus)))
