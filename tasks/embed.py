"""The Ray Data pipeline: read + decode in CPU tasks, CLIP in an actor pool, streamed back.

Heavy objects are built once per actor (``load_clip`` in the constructor).  Rows that failed to
decode travel on with their ``stage``/``error`` so the driver can record them; nothing is
dropped.  Only paths and small metadata go in; vectors come out, pixels never leave Ray.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Iterator
from functools import partial

import numpy as np
import pyarrow as pa

from tasks.clip_model import ClipSpec, load_clip
from tasks.decode import decode_batch
from tasks.storage import StorageConfig

log = logging.getLogger(__name__)

#: retries of a batch whose decode worker or CLIP actor process died (Ray Data's default is
#: unlimited: one input that crashes the process every time would stall the run forever).
#: Passed as ``ray_remote_args`` (``max_retries``/``max_task_retries``), the only way in Ray
#: 2.60 (it warns that these move to named parameters in 2.64).
BATCH_RETRIES = 3


class PipelineError(RuntimeError):
    """The Ray pipeline gave up (a batch kept killing its worker); committed chunks are kept."""


def init_ray(address: str | None, num_cpus: int | None, temp_dir: str) -> None:
    """Connect to a cluster (address) or start a local Ray once per process."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    # Ray starts its daemons with fork+exec; lancedb warns about fork, but exec replaces the
    # child at once, so no lancedb state is used there.
    warnings.filterwarnings("ignore", message="lancedb fork support is experimental")
    if address:
        _connect(address)
        return
    os.makedirs(temp_dir, exist_ok=True)
    ray.init(num_cpus=num_cpus or os.cpu_count(), include_dashboard=False,
             log_to_driver=False, ignore_reinit_error=True, _temp_dir=os.path.abspath(temp_dir))


def _connect(address: str) -> None:
    """Join a running cluster.  Workers import this project's modules by name, so every node
    needs the same environment (this package installed, e.g. ``pip install -e .`` or one
    container image); nothing is shipped with the job.  Ray 2.60 heads started by
    ``ray start`` use token authentication when a token exists, and a driver given an explicit
    address only sends one with ``RAY_AUTH_MODE=token``: say so instead of a bare refusal."""
    import ray

    try:
        ray.init(address=address, log_to_driver=False, ignore_reinit_error=True)
    except ConnectionError as e:
        hint = ""
        if os.environ.get("RAY_AUTH_MODE", "").lower() != "token":
            hint = ("; if the cluster uses token authentication, set RAY_AUTH_MODE=token and "
                    "RAY_AUTH_TOKEN (or ~/.ray/auth_token) to the cluster's token")
        raise ConnectionError(f"cannot connect to the Ray cluster at {address}: {e}{hint}") from e


class ClipEmbedder:
    """Actor: holds one CLIP model; embeds the rows that decoded, passes the others through."""

    def __init__(self, spec: ClipSpec, threads: int | None = None):
        import torch

        if threads:
            torch.set_num_threads(threads)
        self.clip = load_clip(spec)

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
        return batch


def embed_files(todo: pa.Table, spec: ClipSpec, *, image_size: int, max_pixels: int,
                batch_size: int, decode_batch_size: int, actors: int, actor_cpus: float,
                decode_cpus: float, out_rows: int, threads: int | None = None,
                storage: StorageConfig | None = None) -> Iterator[pa.Table]:
    """Stream ``todo`` rows back as Arrow tables with image_id/width/height/stage/error/vector.

    ``storage`` (endpoint, region, driver credentials) is shipped to the decode tasks."""
    import ray

    if todo.num_rows == 0:
        return
    _quiet_ray_data()
    block = max(decode_batch_size, 64)
    blocks = [todo.slice(i, block) for i in range(0, todo.num_rows, block)]
    gpus = 1 if spec.device == "cuda" or (
        spec.device == "auto" and ray.cluster_resources().get("GPU", 0) >= 1) else 0
    ds = ray.data.from_arrow(blocks).map_batches(
        partial(decode_batch, size=image_size, max_pixels=max_pixels, storage=storage),
        batch_size=decode_batch_size, batch_format="numpy", num_cpus=decode_cpus,
        max_retries=BATCH_RETRIES,
    )
    ds = ds.map_batches(
        ClipEmbedder, fn_constructor_kwargs={"spec": spec,
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


def _quiet_ray_data() -> None:
    """Our own progress reporting replaces Ray Data's per-operator logs and bars."""
    import ray

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    ctx.execution_options.verbose_progress = False
    for name in ("ray.data", "ray.data._internal"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # the retry caps have no named parameter in Ray 2.60 yet; the notice is not the user's to act on
    warnings.filterwarnings("ignore", message=r".*`ray_remote_args` is deprecated")


def _threads(actor_cpus: float) -> int:
    return max(1, int(round(actor_cpus)))
