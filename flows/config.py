"""Typed configs built from ``Settings``: the one place where settings turn into what the
stages take (storage, CLIP spec, engine config, search options, index policy, Ray start-up).

Stages never see ``Settings`` nor read the environment: they receive these small values, so a
stage called from a test, a benchmark or a Ray worker gets exactly what the flow would give it.
"""

from __future__ import annotations

import os
from pathlib import Path

from mmrag.settings import Settings
from schemas.tables import table_names, table_suffix
from tasks.ingest.changes import ChangeOptions
from tasks.io.cluster import RayConfig
from tasks.io.objstore import StorageConfig
from tasks.io.store import IndexPolicy
from tasks.models.clip import ClipSpec, resolve_spec
from tasks.models.engines import EngineConfig, box_convention_for, resolve_engine
from tasks.models.text import TextSpec, resolve_text
from tasks.query.embed import RayEmbed
from tasks.query.generate import GenerateOptions


def storage(settings: Settings) -> StorageConfig:
    """Endpoint and region from settings; credentials from the standard AWS variables."""
    return StorageConfig.create(settings.s3_endpoint, settings.s3_region,
                                settings.s3_allow_http, os.environ)


def clip_spec(settings: Settings) -> ClipSpec:
    """The spec every stage builds its CLIP model from (tiny checkpoint built on demand)."""
    return resolve_spec(*settings.clip_spec(), settings.cache_dir, settings.precision,
                        settings.clip_scales)


def text_spec(settings: Settings) -> TextSpec | None:
    """The caption encoder (None: no caption vectors); the tiny one built on demand."""
    return resolve_text(*settings.caption_spec(), clip_spec(settings), settings.cache_dir)


def search_options(settings: Settings) -> dict:
    """The knobs ``tasks.query.retrieve.search_all`` takes; query runs and evaluations share
    them."""
    return {"nprobes": settings.nprobes, "refine_factor": settings.refine_factor,
            "rerank_weight": settings.rerank_weight, "rerank_depth": settings.rerank_depth,
            "spaces": settings.hybrid_spaces, "fusion": settings.fusion,
            "rrf_k": settings.rrf_k, "image_weight": settings.image_weight,
            "caption_weight": settings.caption_weight, "text_weight": settings.text_weight}


def index_policy(settings: Settings) -> IndexPolicy:
    return IndexPolicy(settings.ann_min_rows, settings.ann_index,
                       settings.version_retention_days)


def change_options(settings: Settings, allow_deletes: bool = False) -> ChangeOptions:
    """The deletion safety valve (``allow_deletes``: this run may delete any share)."""
    return ChangeOptions(settings.max_delete_fraction, allow_deletes)


def engine_config(settings: Settings) -> EngineConfig:
    """The VLM engine after profile defaults (``auto``, ``tiny`` and the box convention
    resolved here)."""
    name, model = resolve_engine(*settings.vlm_spec(), settings.cache_dir)
    return EngineConfig(
        name, model, max_new_tokens=settings.max_new_tokens, temperature=settings.temperature,
        batch_size=settings.gen_batch_size, seed=settings.gen_seed, adapter=settings.vlm_adapter,
        top_p=settings.gen_top_p, top_k=settings.gen_top_k, max_model_len=settings.max_model_len,
        gpu_memory_utilization=settings.vllm_gpu_memory_utilization,
        tensor_parallel_size=settings.vllm_tensor_parallel_size,
        max_num_seqs=settings.vllm_max_num_seqs, enforce_eager=settings.vllm_enforce_eager,
        box_convention=box_convention_for(settings.vlm_spec()[1], settings.box_convention))


def generate_options(settings: Settings) -> GenerateOptions:
    """Engine replicas on Ray and what each reserves (``tasks.query.generate``)."""
    return GenerateOptions(settings.gen_replicas, settings.gen_replica_gpus,
                           settings.gen_replica_cpus, settings.gen_prompt_cpus,
                           settings.gen_batch_size, settings.max_image_pixels)


def ray_embed(settings: Settings) -> RayEmbed:
    """When large queries files are embedded in Ray CLIP actors, and with how many."""
    return RayEmbed(settings.query_ray_min_queries, settings.embed_actors,
                    settings.embed_actor_cpus, max(settings.batch_size, 64))


def images_table(settings: Settings) -> str:
    """The images table the query flow searches for these settings (same rule as
    ``tasks.query.retrieve.pin_images``)."""
    suffix = settings.table_suffix
    if suffix is None:
        suffix = table_suffix(clip_spec(settings).label)
    return table_names(suffix)[0]


def ray(settings: Settings) -> RayConfig:
    return RayConfig(settings.ray_address, settings.ray_num_cpus,
                     str(Path(settings.cache_dir) / "ray"))


def pipeline_opts(settings: Settings) -> dict:
    """The Ray Data pipeline's knobs, from settings."""
    return dict(max_pixels=settings.max_image_pixels, batch_size=settings.batch_size,
                decode_batch_size=settings.decode_batch_size, actors=settings.embed_actors,
                actor_cpus=settings.embed_actor_cpus, decode_cpus=settings.decode_cpus,
                threads=settings.embed_threads or max(1, (settings.ray_num_cpus or os.cpu_count()
                                                          or 1) // settings.embed_actors),
                out_rows=settings.commit_rows, reduced_decode=settings.reduced_decode,
                text=text_spec(settings))
