"""What a command starts before its flow: Ray (``mmrag query``, ``mmrag ingest``), and for an
ingest the embedding pipeline for the files the flow is about to plan.

No Prefect here: the command starts this in a thread while it imports Prefect and its flow,
so Ray's daemons (and an ingest's CLIP actors) start seconds earlier, and the flow no longer
waits for ``ray.init`` before its first steps (``tasks.io.cluster.start_early``).
"""

from __future__ import annotations

from functools import partial

from flows import config
from mmrag.settings import Settings
from tasks.ingest import prestart
from tasks.ingest import run as ingest
from tasks.io.cluster import init_ray, start_early
from tasks.io.objstore import is_local
from tasks.models.clip import model_shape


def warm_up(source: str, settings: Settings) -> bool:
    """Start Ray now when SOURCE has files to read, and start the embedding pipeline too
    (``settings.ingest_prestart``): its CLIP actors load while the flow plans, and the flow
    feeds it the plan (``tasks.ingest.prestart``).  A run with nothing new never starts Ray.
    True when Ray was started (or joined).

    Local dumps only: the check lists the dump once more, which a local folder does in well
    under a second, while listing a large bucket can take longer than the start it would hide
    (such runs start Ray when they reach the embedding step, as before)."""
    if not is_local(source):
        return False
    spec = config.clip_spec(settings)
    expected = ingest.new_file_count(source, settings.db, spec, model_shape(spec)[0],
                                     settings.table_suffix, config.storage(settings))
    if not expected:
        return False
    _ray(settings)
    if settings.ingest_prestart:
        ingest.prestart_embedding(expected, settings.db, spec, settings.work_dir,
                                  config.pipeline_opts(settings), config.storage(settings))
    return True


def start(source: str, settings: Settings) -> None:
    """``warm_up`` in a thread; the flow's own ``init_ray`` and the pipeline hand-over wait
    for it."""
    start_early(partial(warm_up, source, settings))


def start_ray(settings: Settings) -> None:
    """Ray (and Ray Data's import) in a thread, for a flow that always needs it: the query
    flow embeds its queries and generates on Ray; its ``init_ray`` waits for this."""
    start_early(partial(_ray, settings))


def _ray(settings: Settings) -> None:
    init_ray(config.ray(settings))
    import ray.data  # noqa: F401 - imported here, beside Prefect's start, not in the flow


def cool_down() -> bool:
    """After the flow: cancel a pre-started pipeline it did not use (nothing to embed after
    all, or the flow failed).  True when there was one."""
    return prestart.cancel_pending()
