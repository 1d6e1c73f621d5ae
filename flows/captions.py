"""Caption vectors outside the CLIP actors: the ingest flow's end-of-run refresh, and the
caption backfill (``mmrag backfill --captions``) that upgrades an existing table in place.

Both read the ``caption`` column only (``tasks.ingest.captions``): no image is listed, read or
decoded, so a table whose image files are gone can still gain its caption space.
"""

from __future__ import annotations

from prefect import flow, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE

from flows import config
from flows.common import call as _call
from flows.common import in_flow_run as _in_flow_run
from flows.common import logger as _logger
from flows.progress import progress
from mmrag.settings import Settings
from tasks.ingest import captions
from tasks.models.clip import model_shape


def _open(settings: Settings):
    spec = config.clip_spec(settings)
    return captions.open_images(settings.db, model_shape(spec)[0], spec.label,
                                settings.table_suffix, config.storage(settings))


@task(name="caption-vectors", cache_policy=NO_CACHE)
def refresh_task(settings: Settings) -> dict:
    """Embed the captions an ingest run left without a vector (changed captions, a failed
    caption batch); a no-op without a caption encoder."""
    text = config.text_spec(settings)
    if text is None:
        return {}
    images = _open(settings)
    if captions.caption_width(images) is None:
        return {}  # an old table: `mmrag backfill --captions` upgrades it, not an ingest
    counts = captions.refresh_captions(images, settings.db, text,
                                       commit_rows=settings.commit_rows)
    if counts.embedded:
        _logger("mmrag.ingest").info("caption vectors refreshed: %d", counts.embedded)
    return counts.as_dict()


@task(name="caption-backfill", cache_policy=NO_CACHE)
def backfill_task(settings: Settings) -> dict:
    text = config.text_spec(settings)
    if text is None:
        raise ValueError("MMRAG_CAPTION_ENCODER=none: no caption vectors to backfill; set it "
                         "to clip (default) or sentence-transformers")
    spec = config.clip_spec(settings)
    images = _open(settings)
    with progress(images.count_rows(), "caption vectors", _logger()) as advance:
        counts = captions.backfill_captions(
            settings.db, model_shape(spec)[0], spec.label, text, settings.table_suffix,
            config.storage(settings), settings.commit_rows, advance)
    return counts.as_dict() | {"caption_model": text.label, "images_table": images.name}


@flow(name="caption-backfill", log_prints=True)
def caption_backfill_flow(settings: Settings | None = None) -> dict:
    """Give the images table its caption vectors in place (old tables, a new text model)."""
    settings = settings or Settings()
    summary = _call(backfill_task, settings) | {"db": settings.db}
    if _in_flow_run():
        create_table_artifact([{"metric": k, "value": str(v)} for k, v in summary.items()],
                              key="caption-backfill-summary",
                              description="caption vectors backfill")
    _logger().info("caption backfill summary: %s", summary)
    return summary
