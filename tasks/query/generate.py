"""Generation on Ray: retrieved rows → prompts + grids (CPU tasks) → engine replicas (actors).

The generate stage is a Ray Data pipeline, so it runs on the local Ray or on a cluster
(``MMRAG_RAY_ADDRESS``) like ingest, and scales with the number of engine replicas:

1. ``build_requests`` (CPU tasks): loads the thumbnails, tiles the grid, and fits the prompt to
   the model's context in the model's own tokens (``tasks.query.budget``; the tokenizer is
   loaded once per worker).  A question too long for the model becomes that row's error.
2. ``Generator`` (a fixed pool of actors, ``replicas`` of them): each builds its engine once
   (vLLM: one replica per GPU, or per ``tensor_parallel_size`` GPUs; transformers: CPU actors,
   or one GPU each where the cluster has GPUs) and answers batches of requests.  Each request
   carries its own seed (run seed + query position), so an answer does not depend on its
   batch or replica; greedy answers are identical for any replica count.

One failing request only errors its own row (the engines retry a failing batch one by one); a
replica whose process dies is restarted and its batch retried ``BATCH_RETRIES`` times, then
the run stops with ``GenerationError`` and writes nothing (a re-run redoes the run).

Why not ``ray.data.llm`` (``vLLMEngineProcessorConfig`` with its multimodal stage), Ray's own
batch-LLM processor, which builds the same actor pool: Ray 2.60's ``ray[llm]`` extra pins
``vllm==0.29.0`` (and that vLLM's torch), so it cannot be installed next to the vLLM 0.33 of
the ``gpu`` extra; its multimodal stage takes OpenAI-style chat messages and renders them with
the model's chat template in a vLLM ``ModelConfig`` on every CPU worker, while these prompts
are rendered and token-budgeted here already with the one image attached as pixels; and it
drives vLLM only, where this stage must also run the transformers engine on CPU actors with
the same prompts, seeds and sampling.  So the pipeline uses the same building blocks
(``map_batches`` with an actor pool, GPUs per actor) directly.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pyarrow as pa
from PIL import Image

from tasks.io.cluster import BATCH_RETRIES, quiet_ray_data
from tasks.io.objstore import StorageConfig
from tasks.models.engines import (
    EngineConfig,
    GenRequest,
    load_tokenizer,
    make_engine,
    model_limits,
    request_seed,
)
from tasks.query.boxes import Tile
from tasks.query.budget import Budget, PromptTooLong, fit_prompt, tokenizer_budget
from tasks.query.grid import GRID_SIZE, MAX_GRID, build_grid, load_thumbnail

INPUT_COLUMNS = ["_i", "text", "image_path", "retrieved"]


class GenerationError(RuntimeError):
    """The Ray generation pipeline gave up: the engine could not start, or a replica kept
    dying on the same batch."""


class EngineStartError(RuntimeError):
    """An engine replica could not build its engine (bad model path, adapter, no GPU …)."""


_START_FAILED = re.compile(r"the \w+ engine could not start[^\n\x1b]*")


@dataclass(frozen=True)
class GenerateOptions:
    """Replicas of the engine and what each reserves; ``replica_gpus`` None = automatic (vLLM:
    ``tensor_parallel_size``; transformers: 1 when the cluster has GPUs, else 0)."""

    replicas: int = 1
    replica_gpus: float | None = None
    replica_cpus: float = 1.0
    prompt_cpus: float = 0.25
    batch_size: int = 8
    max_pixels: int = 64_000_000


@functools.lru_cache(maxsize=4)
def prompt_budget(engine: EngineConfig) -> Budget | None:
    """The engine's budget (its tokenizer loaded once per process); None for engine none."""
    if engine.name == "none":
        return None
    context, image_tokens = model_limits(engine.model)
    return tokenizer_budget(load_tokenizer(engine.model),
                            min(engine.max_model_len or context, context), image_tokens,
                            engine.max_new_tokens)


def make_request(row: dict, engine: EngineConfig, max_pixels: int,
                 storage: StorageConfig | None = None) -> tuple[dict, Image.Image | None]:
    """One row's fitted prompt and grid (query photo first, then the best hits), with the
    tiles that say which photo sits where, so boxes can be mapped back to their photo."""
    hits = row["retrieved"] or []
    query_img = load_thumbnail(row["image_path"], GRID_SIZE, max_pixels) \
        if row["image_path"] else None
    shown = hits[: MAX_GRID - (1 if query_img else 0)]
    images = ([query_img] if query_img else []) + [
        load_thumbnail(h["source_uri"], GRID_SIZE, max_pixels, storage) for h in shown]
    who = ([(None, None)] if query_img else []) + [(h["image_id"], h["rank"]) for h in shown]
    tiles = [Tile(i, r, *(im.size if im else (None, None)))
             for (i, r), im in zip(who, images, strict=True)]
    grid = build_grid(images, (["Q"] if query_img else []) + [str(h["rank"]) for h in shown],
                      GRID_SIZE) if images else None
    budget = prompt_budget(engine)
    fitted = fit_prompt(row["text"], hits, has_query_image=query_img is not None,
                        has_image=grid is not None, budget=budget,
                        box_convention=engine.box_convention)
    return {"prompt": fitted.prompt, "tiles": json.dumps([dataclasses.asdict(t) for t in tiles]),
            "n_context_dropped": fitted.n_dropped, "counted_tokens": fitted.n_tokens,
            "token_budget": budget.limit if budget else None}, grid


def build_requests(batch: pa.Table, engine: EngineConfig, max_pixels: int,
                   storage: StorageConfig | None = None) -> pa.Table:
    """Ray task: the request columns of a block of rows; a failure is that row's ``error``."""
    out: list[dict] = []
    for row in batch.select(INPUT_COLUMNS).to_pylist():
        item = {"_i": row["_i"], "tiles": "[]"}
        try:
            fields, grid = make_request(row, engine, max_pixels, storage)
            item |= fields | {"grid": grid.tobytes() if grid else None}
        except PromptTooLong as e:
            item["error"] = str(e)
        except Exception as e:  # noqa: BLE001 - recorded on the row, the run goes on
            item["error"] = f"prompt failed: {type(e).__name__}: {e}"
        out.append(item)
    return pa.Table.from_pylist(out, schema=REQUEST_SCHEMA)


REQUEST_SCHEMA = pa.schema([("_i", pa.int64()), ("prompt", pa.string()), ("grid", pa.binary()),
                            ("tiles", pa.string()), ("n_context_dropped", pa.int32()),
                            ("counted_tokens", pa.int32()), ("token_budget", pa.int32()),
                            ("error", pa.string())])


class Generator:
    """Ray actor: one engine, built once; answers blocks of requests (errored rows pass)."""

    def __init__(self, engine: EngineConfig, threads: int | None = None):
        if threads and engine.name == "transformers":
            import torch

            torch.set_num_threads(threads)
        try:
            self.engine, self.seed = make_engine(engine), engine.seed
        except Exception as e:  # one line that the driver can find in Ray's error text
            detail = " ".join(f"{type(e).__name__}: {e}".split())
            raise EngineStartError(f"the {engine.name} engine could not start ({engine.model}): "
                                   f"{detail}") from e

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.drop_columns(["grid"]).to_pylist()
        todo = [i for i, r in enumerate(rows) if r["error"] is None]
        grids = batch["grid"].to_pylist()
        began = time.perf_counter()
        results = self.engine.generate([
            GenRequest(rows[i]["prompt"], _image(grids[i]), request_seed(self.seed, rows[i]["_i"]))
            for i in todo])
        ms = (time.perf_counter() - began) * 1000 / max(len(todo), 1)
        for i, res in zip(todo, results, strict=True):
            rows[i] |= {"text": res.text, "gen_error": res.error, "generation_ms": ms,
                        "n_prompt_tokens": res.n_prompt_tokens,
                        "n_generated_tokens": res.n_generated_tokens}
        return pa.Table.from_pylist(rows, schema=RESULT_SCHEMA)


RESULT_SCHEMA = REQUEST_SCHEMA.remove(REQUEST_SCHEMA.get_field_index("grid")).append(
    pa.field("text", pa.string())).append(pa.field("gen_error", pa.string())).append(
    pa.field("generation_ms", pa.float32())).append(
    pa.field("n_prompt_tokens", pa.int32())).append(pa.field("n_generated_tokens", pa.int32()))


def _image(grid: bytes | None) -> Image.Image | None:
    return Image.frombytes("RGB", (GRID_SIZE, GRID_SIZE), grid) if grid else None


def replica_gpus(options: GenerateOptions, engine: EngineConfig, cluster_gpus: float) -> float:
    """GPUs each replica reserves (see ``GenerateOptions``)."""
    if options.replica_gpus is not None:
        return options.replica_gpus
    if engine.name == "vllm":
        return float(engine.tensor_parallel_size)
    wants_gpu = engine.name == "transformers" and engine.device in (None, "cuda")
    return 1.0 if wants_gpu and cluster_gpus >= 1 else 0.0


def generate(rows: pa.Table, engine: EngineConfig, options: GenerateOptions,
             storage: StorageConfig | None = None,
             progress: Callable[[int], None] | None = None) -> Iterator[dict]:
    """Stream one result dict per input row (keyed by ``_i``) from the Ray pipeline."""
    import ray

    if rows.num_rows == 0:
        return
    quiet_ray_data()
    size = options.batch_size
    blocks = [rows.select(INPUT_COLUMNS).slice(i, size) for i in range(0, rows.num_rows, size)]
    gpus = replica_gpus(options, engine, ray.cluster_resources().get("GPU", 0))
    ds = ray.data.from_arrow(blocks).map_batches(
        build_requests, fn_kwargs={"engine": engine, "max_pixels": options.max_pixels,
                                   "storage": storage},
        batch_size=size, batch_format="pyarrow", num_cpus=options.prompt_cpus,
        max_retries=BATCH_RETRIES)
    ds = ds.map_batches(
        Generator, fn_constructor_kwargs={"engine": engine,
                                          "threads": max(1, round(options.replica_cpus))},
        compute=ray.data.ActorPoolStrategy(size=options.replicas), batch_size=size,
        batch_format="pyarrow", num_cpus=options.replica_cpus, num_gpus=gpus,
        max_task_retries=BATCH_RETRIES)
    try:
        for out in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            yield from out.to_pylist()
            if progress:
                progress(out.num_rows)
    except ray.exceptions.RayError as e:
        started = _START_FAILED.search(str(e))
        if started:
            raise GenerationError(started.group(0)) from e
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise GenerationError(
            f"generation stopped ({type(e).__name__}: {first}); an engine replica died on the "
            f"same batch {BATCH_RETRIES + 1} times (out of memory, or an input that crashes "
            "it?). No answers were written: fix the cause and re-run") from e
