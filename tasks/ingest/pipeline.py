"""The Ray Data pipeline: read + decode in CPU tasks, CLIP in an actor pool, streamed back.

Heavy objects are built once per actor (``load_clip`` in the constructor).  Rows that failed to
decode travel on with their ``stage``/``error`` so the driver can record them; nothing is
dropped.  Only paths and small metadata go in; vectors come out, pixels never leave Ray.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from functools import partial

import numpy as np
import pyarrow as pa

from tasks.io.cluster import BATCH_RETRIES, quiet_ray_data
from tasks.io.images import decode_batch
from tasks.io.objstore import StorageConfig
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


def embed_files(todo: pa.Table, spec: ClipSpec, *, image_size: int, max_pixels: int,
                batch_size: int, decode_batch_size: int, actors: int, actor_cpus: float,
                decode_cpus: float, out_rows: int, threads: int | None = None,
                storage: StorageConfig | None = None, reduced_decode: bool = True,
                text: TextSpec | None = None) -> Iterator[pa.Table]:
    """Stream ``todo`` rows back as Arrow tables with image_id/width/height/stage/error/vector
    (and ``caption_vector`` when a caption encoder ``text`` is given).

    ``storage`` (endpoint, region, driver credentials) is shipped to the decode tasks."""
    import ray

    if todo.num_rows == 0:
        return
    quiet_ray_data()
    # no more CLIP actors than model batches: each actor pays a model load at start-up
    actors = max(1, min(actors, -(-todo.num_rows // batch_size)))
    decode_rows = max(1, min(decode_batch_size, -(-todo.num_rows // actors)))
    block = max(decode_rows, min(64, -(-todo.num_rows // actors)))
    blocks = [todo.slice(i, block) for i in range(0, todo.num_rows, block)]
    gpus = 1 if spec.device == "cuda" or (
        spec.device == "auto" and ray.cluster_resources().get("GPU", 0) >= 1) else 0
    ds = ray.data.from_arrow(blocks).map_batches(
        partial(decode_batch, size=image_size, max_pixels=max_pixels, storage=storage,
                reduced=reduced_decode),
        batch_size=decode_rows, batch_format="numpy", num_cpus=decode_cpus,
        max_retries=BATCH_RETRIES,
    )
    ds = ds.map_batches(
        ClipEmbedder, fn_constructor_kwargs={"spec": spec, "text": text,
                                             "threads": threads or _threads(actor_cpus)},
        compute=ray.data.ActorPoolStrategy(size=actors), batch_size=batch_size,
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
