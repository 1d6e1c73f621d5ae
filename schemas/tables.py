"""LanceDB table contracts: ``images``, ``files`` and ``rejects``.

Defined once here as ``LanceModel``s; every Arrow schema the pipeline writes is derived from
them.  The ``images`` vector widths depend on the CLIP model and the caption text model, so its
model is built per pair of widths.
"""

from __future__ import annotations

import re
from datetime import datetime
from functools import cache

import pyarrow as pa
from lancedb.pydantic import LanceModel, Vector
from pydantic import Field, create_model

SCORE_COLUMNS = (
    "livelier",
    "more_beautiful",
    "more_boring",
    "more_depressing",
    "safer",
    "wealthier",
)
FILE_STATUSES = ("ingested", "duplicate", "rejected", "deleted")
#: statuses of files that hold an image now (``deleted`` files held one once)
LIVE_STATUSES = ("ingested", "duplicate")
REJECT_STAGES = ("path", "missing", "read", "decode", "metadata", "embed")

IMAGES_TABLE = "images"
FILES_TABLE = "files"
REJECTS_TABLE = "rejects"
SOURCES_TABLE = "sources"

#: models whose tables carry no suffix: the two profiles' defaults
UNSUFFIXED_MODELS = frozenset({
    "ViT-B-32/laion2b_s34b_b79k",
    "mmrag-tiny-clip/mmrag-tiny-clip-seed0.safetensors",
})


def table_suffix(clip_label: str) -> str:
    """Vectors of two models never share a column: each model gets its own table set.

    The profiles' default models use ``images``/``files``/``rejects``; any other model uses
    ``images__<model>`` etc., so re-embedding with a new model is a backfill into new tables.
    """
    if clip_label in UNSUFFIXED_MODELS:
        return ""
    return "__" + re.sub(r"[^a-z0-9]+", "_", clip_label.lower()).strip("_")[:80]


def table_names(suffix: str) -> tuple[str, str, str]:
    return IMAGES_TABLE + suffix, FILES_TABLE + suffix, REJECTS_TABLE + suffix


def sources_table(suffix: str) -> str:
    """The per-dump state of a table set (kept apart from ``table_names``' three)."""
    return SOURCES_TABLE + suffix


_SCORE_DOC = "Place Pulse perception score; null when missing or not a finite number"


class ImageMeta(LanceModel):
    """Columnar metadata of one image (from metadata.json or its Place Pulse file name)."""

    city: str | None = Field(None, description="city name")
    lat: float | None = Field(None, description="latitude, degrees")
    lon: float | None = Field(None, description="longitude, degrees")
    place_id: str | None = Field(None, description="Place Pulse place id")
    caption: str | None = Field(None, description="captions joined by newlines")
    livelier: float | None = Field(None, description=_SCORE_DOC)
    more_beautiful: float | None = Field(None, description=_SCORE_DOC)
    more_boring: float | None = Field(None, description=_SCORE_DOC)
    more_depressing: float | None = Field(None, description=_SCORE_DOC)
    safer: float | None = Field(None, description=_SCORE_DOC)
    wealthier: float | None = Field(None, description=_SCORE_DOC)


class ImageIdentity(LanceModel):
    """Which bytes, and where they were first found."""

    image_id: str = Field(description="sha256 of the file bytes, hex")
    source_uri: str = Field(description="absolute path or URI of the file it comes from: of "
                            "the live files holding these bytes, the smallest source_uri")
    rel_path: str = Field(description="path relative to the dump root, '/' separators")
    file_name: str = Field(description="base name of the file")


class ImageTech(LanceModel):
    """Decode facts and provenance of the embedding."""

    width: int = Field(description="pixels, after EXIF orientation")
    height: int = Field(description="pixels, after EXIF orientation")
    clip_model: str = Field(description="open_clip model/pretrained that made the vector")
    run_id: str = Field(description="ingest run that embedded the row")
    ingested_at: datetime = Field(description="UTC time the row was first written")


class ImageBase(ImageTech, ImageMeta, ImageIdentity):
    """One row per distinct image content; columns in identity, metadata, provenance order."""


#: ``images`` schema version (in the Arrow schema metadata).  History: 1 = the first table;
#: 2 adds ``caption_vector`` and ``caption_model`` (a dense caption space beside the image
#: space).  A version-1 table gains them in place, as nulls, on its next write or with
#: ``mmrag backfill --captions`` (which also embeds the captions; no image is read).
IMAGES_SCHEMA_VERSION = "2"
CAPTION_COLUMNS = ("caption_vector", "caption_model")


@cache
def image_record(dim: int, caption_dim: int | None = None) -> type[LanceModel]:
    """The ``images`` row model for a CLIP embedding width ``dim`` and a caption vector width
    ``caption_dim`` (None = ``dim``: captions embedded by the CLIP text tower)."""
    return create_model(
        f"ImageRecord{dim}x{caption_dim or dim}",
        __base__=ImageBase,
        vector=(Vector(dim), Field(description="L2-normalised CLIP image embedding")),
        caption_vector=(Vector(caption_dim or dim) | None, Field(
            None, description="L2-normalised embedding of the caption text by caption_model "
            "(the CLIP text tower by default: the space text queries live in); null where the "
            "image has no caption, or its caption changed and is not embedded yet")),
        caption_model=(str | None, Field(
            None, description="text model that made caption_vector (e.g. "
            "clip:ViT-B-32/laion2b_s34b_b79k); null when caption_vector is null")),
    )


#: ``files`` schema version (in the Arrow schema metadata).  History: 1 = the first ledger;
#: 2 adds ``meta_hash``, ``deleted_run_id``, ``deleted_at`` and status ``deleted``.  A version-1
#: table is upgraded in place when opened (the new columns added as nulls).
FILES_SCHEMA_VERSION = "2"


class FileRecord(LanceModel):
    """The ledger: one row per source file ever seen; makes runs incremental."""

    source_uri: str = Field(description="absolute path or URI of the file")
    rel_path: str = Field(description="path relative to the dump root")
    file_name: str = Field(description="base name")
    size: int = Field(description="bytes at listing time")
    mtime: float = Field(description="modification time at listing, seconds since epoch")
    image_id: str | None = Field(None, description="sha256 of its bytes; null when rejected")
    status: str = Field(description="ingested | duplicate | rejected | deleted")
    run_id: str = Field(description="run that recorded it")
    meta_hash: str | None = Field(
        None, description="sha256 of the file's metadata values (its metadata row, or its "
        "name); null in rows written before schema version 2")
    deleted_run_id: str | None = Field(
        None, description="run that found the file gone from its dump (status deleted)")
    deleted_at: datetime | None = Field(None, description="UTC time it was found gone")


class SourceRecord(LanceModel):
    """One row per dump: its metadata file as last applied, and what its last run changed."""

    source: str = Field(description="dump root (absolute path or URI)")
    status: str = Field(description="running | done (running after a run that did not finish: "
                        "the next run re-checks the whole dump)")
    run_id: str = Field(description="last run that changed the dump's rows")
    metadata_uri: str | None = Field(None, description="metadata file applied (null: none)")
    metadata_size: int | None = Field(None, description="its size in bytes when applied")
    metadata_mtime: float | None = Field(None, description="its mtime when applied")
    metadata_updated: int = Field(0, description="images rows whose metadata the run changed")
    files_deleted: int = Field(0, description="files the run found gone (status deleted)")
    images_deleted: int = Field(0, description="images rows the run deleted (no file left)")
    moved: int = Field(0, description="files the run found moved (same bytes, new path)")
    at: datetime = Field(description="UTC time of the run's last write")


class RejectRecord(LanceModel):
    """Why an input was not ingested; one row per (source_uri, stage)."""

    source_uri: str = Field(description="file or metadata entry that was rejected")
    file_name: str = Field(description="base name (or metadata 'Image Name')")
    stage: str = Field(description="path | missing | read | decode | metadata | embed")
    error: str = Field(description="readable reason")
    run_id: str = Field(description="run that recorded it")
    at: datetime = Field(description="UTC time")


def images_schema(dim: int, caption_dim: int | None = None) -> pa.Schema:
    schema = _tighten(image_record(dim, caption_dim).to_arrow_schema())
    return schema.with_metadata((schema.metadata or {}) | {
        b"mmrag.schema_version": IMAGES_SCHEMA_VERSION.encode()})


def files_schema() -> pa.Schema:
    schema = _tighten(FileRecord.to_arrow_schema())
    return schema.with_metadata((schema.metadata or {}) | {
        b"mmrag.schema_version": FILES_SCHEMA_VERSION.encode()})


def sources_schema() -> pa.Schema:
    return _tighten(SourceRecord.to_arrow_schema())


def rejects_schema() -> pa.Schema:
    return _tighten(RejectRecord.to_arrow_schema())


def _tighten(schema: pa.Schema) -> pa.Schema:
    """Scores and coordinates as float32 / float64 as the contract says; timestamps in UTC."""
    fields = []
    for f in schema:
        if f.name in SCORE_COLUMNS:
            f = f.with_type(pa.float32())
        elif pa.types.is_timestamp(f.type):
            f = f.with_type(pa.timestamp("us", tz="UTC"))
        fields.append(f)
    return pa.schema(fields, metadata=schema.metadata)


BACKFILLS_TABLE = "backfills"
BACKFILL_STATUSES = ("running", "done", "failed")


class BackfillRecord(LanceModel):
    """Progress of one dump inside one backfill; a re-run skips the dumps already ``done``."""

    backfill_id: str = Field(description="stable id: hash of the dump list + CLIP model")
    dump: str = Field(description="dump root (absolute path or URI)")
    clip_model: str = Field(description="model/pretrained the dump is embedded with")
    status: str = Field(description="running | done | failed")
    seen: int = Field(0, description="image files listed in the dump")
    ingested: int = Field(0, description="new images embedded by this backfill")
    duplicates: int = Field(0, description="files whose bytes were already stored")
    rejected: int = Field(0, description="rejects recorded (all stages)")
    seconds: float = Field(0.0, description="wall time of this dump")
    error: str | None = Field(None, description="why the dump failed (status failed)")
    finished_at: datetime | None = Field(None, description="UTC time the status was written")


def backfills_schema() -> pa.Schema:
    return _tighten(BackfillRecord.to_arrow_schema())
