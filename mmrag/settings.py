"""One place for every option: defaults, ``MMRAG_*`` environment variables, CLI overrides.

A leaf: it imports nothing of the project.  Flows turn it into the typed configs the stages
take (``flows.config``).  Profiles choose the model defaults: ``default`` is real ViT-B-32
weights, ``tiny`` a locally built random-weight model for offline runs, tests and CI.  Anything
set explicitly wins over the profile.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

PROFILE_DEFAULTS: dict[str, dict[str, str]] = {
    "default": {"clip_model": "ViT-B-32", "clip_pretrained": "laion2b_s34b_b79k",
                "engine": "auto", "vlm_model": "llava-hf/llava-1.5-7b-hf",
                "caption_model": "BAAI/bge-small-en-v1.5"},
    "tiny": {"clip_model": "mmrag-tiny-clip", "clip_pretrained": "tiny",
             "engine": "transformers", "vlm_model": "tiny", "caption_model": "tiny"},
}


def normalise_endpoint(endpoint: str | None, allow_http: bool) -> str | None:
    """``host:port`` or ``http(s)://host:port`` → a full URL; plain HTTP only when allowed."""
    endpoint = (endpoint or "").strip().rstrip("/")
    if not endpoint:
        return None
    if "://" not in endpoint:
        endpoint = f"{'http' if allow_http else 'https'}://{endpoint}"
    scheme = endpoint.split("://", 1)[0].lower()
    if scheme not in ("http", "https"):
        raise ValueError(f"S3 endpoint {endpoint!r}: expected http(s)://host[:port]")
    if scheme == "http" and not allow_http:
        raise ValueError(
            f"S3 endpoint {endpoint!r} is plain HTTP: set MMRAG_S3_ALLOW_HTTP=true "
            "(meant for a loopback or test server) or use https://"
        )
    return endpoint


def _default_cache() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return str(Path(base) / "mmrag")


class Settings(BaseSettings):
    """Pipeline settings: ``Settings(db=...)`` beats the environment, which beats defaults."""

    model_config = SettingsConfigDict(env_prefix="MMRAG_", extra="ignore")

    db: str = Field("./data/lancedb", description="LanceDB URI (folder or s3://…)")
    s3_endpoint: str | None = Field(
        None, description="S3-compatible endpoint, e.g. https://minio:9000 (None = AWS)"
    )
    s3_region: str | None = Field(None, description="S3 region (None = SDK default / bucket's)")
    s3_allow_http: bool = Field(
        False, description="allow a plain-HTTP S3 endpoint (loopback or test servers only)"
    )
    profile: Literal["default", "tiny"] = Field("default", description="model profile")
    clip_model: str | None = Field(None, description="open_clip model name (profile default)")
    clip_pretrained: str | None = Field(
        None, description="open_clip pretrained tag or local checkpoint path (profile default)"
    )
    clip_scales: list[float] = Field(
        default_factory=lambda: [1.0], description="multi-scale image embeddings: zooms pooled "
        "per image, e.g. [1, 2] (1 = off; a separate table set; see docs/guide/ingest.md)"
    )
    precision: Literal["auto", "fp32", "bf16", "fp16", "int8"] = Field(
        "auto", description="model precision; auto = fp16 on GPU, on CPU bf16 only where it "
        "is measured faster than fp32 (kept per CPU in the cache dir); int8 = "
        "dynamically quantised image tower on CPU (opt-in; its own table set)"
    )
    batch_size: int = Field(
        32, ge=1, description="images per model batch (measured on CPU: 32 is 13% faster than 64 "
        "in bf16 and the same in fp32; on a GPU raise it, e.g. 256)"
    )
    decode_batch_size: int = Field(32, ge=1, description="files per decode task batch")
    commit_rows: int = Field(2048, ge=1, description="rows per LanceDB commit during ingest")
    max_delete_fraction: float = Field(
        0.2, ge=0, le=1, description="safety valve: an ingest that finds more than this share "
        "of a dump's known files gone deletes nothing and exits 2 (mmrag ingest --allow-deletes "
        "overrides once; 1 = never refuse)"
    )
    ray_address: str | None = Field(None, description="Ray cluster address; None = local Ray")
    ray_num_cpus: int | None = Field(None, ge=1, description="CPUs for a local Ray (None = all)")
    embed_actors: int = Field(
        2, ge=1, description="CLIP actors (measured: 2 single-thread actors beat 1 two-thread "
        "actor by 16% on 2 cores; use one per GPU on GPU machines)"
    )
    embed_actor_cpus: float = Field(
        0.9, gt=0, description="CPUs reserved per CLIP actor (with decode_cpus: 2 actors and "
        "one decode task fill 2 cores; more decode tasks at once only contend with the model)"
    )
    embed_threads: int | None = Field(
        None, ge=1, description="torch threads per CLIP actor (None = node CPUs / actors)"
    )
    decode_cpus: float = Field(0.2, gt=0, description="CPUs reserved per decode task")
    ingest_prestart: bool = Field(
        True, description="mmrag ingest starts the embedding pipeline (CLIP actors) while the "
        "flow plans, instead of after (local dumps with new files)")
    max_image_pixels: int = Field(
        64_000_000, ge=1, description="decompression-bomb guard: larger images are rejected"
    )
    reduced_decode: bool = Field(
        True, description="decode JPEGs at reduced size before open_clip's resize (faster; "
        "false = pixels exactly as open_clip's preprocess)"
    )
    out: str = Field("./data/out", description="root of the answers Parquet dataset")
    engine: Literal["auto", "vllm", "transformers", "none"] | None = Field(
        None, description="generation engine (profile default; auto = vllm on GPU)"
    )
    vlm_model: str | None = Field(None, description="LLaVA model id or local path (profile)")
    vlm_adapter: str | None = Field(
        None, description="LoRA adapter folder from mmrag finetune, applied to vlm_model by the "
        "transformers engine (vLLM: use the --merge folder as vlm_model instead)"
    )
    max_new_tokens: int = Field(128, ge=1, le=4096, description="tokens generated per answer")
    temperature: float = Field(0.0, ge=0, le=5, description="0 = greedy")
    gen_batch_size: int = Field(8, ge=1, description="prompts per generation batch")
    gen_replicas: int = Field(
        1, ge=1, description="engine replicas (Ray actors) answering in parallel: one per GPU "
        "with vllm, CPU actors with transformers on CPU-only nodes"
    )
    gen_replica_gpus: float | None = Field(
        None, ge=0, description="GPUs per engine replica (None = vllm: "
        "vllm_tensor_parallel_size; transformers: 1 when the cluster has GPUs, else 0)"
    )
    gen_replica_cpus: float = Field(1.0, gt=0, description="CPUs reserved per engine replica "
                                    "(transformers: also its torch threads)")
    gen_prompt_cpus: float = Field(0.25, gt=0, description="CPUs per prompt-building Ray task "
                                   "(thumbnails, grid, token budget)")
    gen_seed: int = Field(0, ge=0, description="run seed: each query samples with seed + its "
                          "position in the queries file")
    gen_top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling when temperature > "
                             "0 (1 = off); the same in every engine")
    gen_top_k: int = Field(0, ge=0, description="top-k sampling when temperature > 0 (0 = off); "
                           "the same in every engine")
    max_model_len: int | None = Field(
        None, ge=64, description="context length prompts are fitted to, in tokens (None = the "
        "model's own: 4096 for llava-1.5); vllm allocates its KV cache for it"
    )
    vllm_gpu_memory_utilization: float = Field(
        0.9, gt=0, le=1, description="vllm: share of each GPU's memory for weights + KV cache"
    )
    vllm_tensor_parallel_size: int = Field(1, ge=1, description="vllm: GPUs one replica spans")
    vllm_max_num_seqs: int | None = Field(
        None, ge=1, description="vllm: sequences in flight per replica (None = vLLM's default)"
    )
    vllm_enforce_eager: bool = Field(
        False, description="vllm: no CUDA graphs (less memory, slower decoding)"
    )
    box_convention: Literal["auto", "padded", "per_mille", "pixels"] = Field(
        "auto", description="how the VLM writes boxes: padded = fractions of the padded square "
        "(llava-1.5), per_mille = 0–1000, pixels = of the prompt image; auto = the model's own"
    )
    query_ray_min_queries: int = Field(
        2000, ge=0, description="queries files at least this long are embedded in Ray CLIP "
        "actors (MMRAG_EMBED_ACTORS of them); 0 = never"
    )
    top_k: int = Field(5, ge=1, description="images retrieved when a query gives none")
    max_top_k: int = Field(100, ge=1, description="largest top_k a query may ask for")
    query_image_roots: list[str] = Field(
        default_factory=list, description="folders query images may come from (+ queries dir)"
    )
    ann_min_rows: int = Field(100_000, ge=1, description="rows before an ANN index is built")
    ann_index: Literal["IVF_SQ", "IVF_PQ", "IVF_HNSW_SQ"] = Field(
        "IVF_SQ", description="ANN index type (chosen by benchmarks/retrieval.py)"
    )
    version_retention_days: float = Field(
        30.0, ge=0, description="table versions kept for time travel by optimize"
    )
    nprobes: int | None = Field(
        20, ge=1, description="ANN partitions probed (indexed tables; see docs/performance.md)"
    )
    refine_factor: int | None = Field(
        5, ge=1, description="ANN re-ranking by exact distance (recall 0.935 → 1.0 at 1M rows)"
    )
    rerank_weight: float = Field(
        0.0, ge=0, le=1, description="hybrid reranking: weight of CLIP similarity vs the "
        "full-text/vector fusion (0 = off)"
    )
    rerank_depth: int = Field(50, ge=1, description="hybrid candidates rescored when reranking")
    caption_encoder: Literal["clip", "sentence-transformers", "none"] = Field(
        "clip", description="caption vectors (the dense caption space): clip = the CLIP "
        "model's own text tower (no new weights); sentence-transformers = caption_model; "
        "none = no caption vectors"
    )
    caption_model: str | None = Field(
        None, description="sentence-transformers model id or local folder for caption "
        "vectors (profile default: BAAI/bge-small-en-v1.5; tiny = a random-weight test model)"
    )
    hybrid_spaces: str = Field(
        "image+caption+text", description="rankings a hybrid query fuses: image (image "
        "vectors), caption (caption vectors), text (full-text on captions), joined by +"
    )
    fusion: Literal["rrf", "weighted"] = Field(
        "rrf", description="how hybrid rankings are fused: rrf = reciprocal rank fusion; "
        "weighted = per-space weights on min-max-scaled scores"
    )
    rrf_k: int = Field(60, ge=1, description="RRF constant: score = sum of 1/(k + rank)")
    image_weight: float = Field(0.7, ge=0, description="weighted fusion: image space (alpha)")
    caption_weight: float = Field(0.3, ge=0, description="weighted fusion: caption space")
    text_weight: float = Field(0.3, ge=0, description="weighted fusion: full text")
    table_suffix: str | None = Field(
        None, description="table-set suffix; None = derived from the CLIP model"
    )
    cache_dir: str = Field(default_factory=_default_cache,
                           description="tiny models, Ray temp, the CPU precision measurement")
    work_dir: str = Field("./data/work", description="per-run scratch files (listings, plans)")

    @model_validator(mode="after")
    def _check_storage(self) -> Settings:
        """An http:// endpoint without s3_allow_http fails here, not mid-run."""
        normalise_endpoint(self.s3_endpoint, self.s3_allow_http)
        return self

    def clip_spec(self) -> tuple[str, str]:
        """The (model, pretrained) pair after applying profile defaults."""
        defaults = PROFILE_DEFAULTS[self.profile]
        return (
            self.clip_model or defaults["clip_model"],
            self.clip_pretrained or defaults["clip_pretrained"],
        )

    def vlm_spec(self) -> tuple[str, str]:
        """(engine, model) after applying profile defaults."""
        defaults = PROFILE_DEFAULTS[self.profile]
        return self.engine or defaults["engine"], self.vlm_model or defaults["vlm_model"]

    def caption_spec(self) -> tuple[str, str | None]:
        """(caption encoder, its model after profile defaults; None for clip and none)."""
        if self.caption_encoder != "sentence-transformers":
            return self.caption_encoder, None
        return self.caption_encoder, (self.caption_model
                                      or PROFILE_DEFAULTS[self.profile]["caption_model"])

    @property
    def is_tiny(self) -> bool:
        return self.clip_spec()[1] == "tiny"
