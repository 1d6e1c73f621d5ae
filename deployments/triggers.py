"""The one event trigger mmrag uses: answer the queries again after an ingest deployment run
completes, so new images show up in the answers without waiting for the next cron tick.

``deployments/prefect.yaml`` spells the same trigger in YAML (a test checks they agree);
``mmrag serve`` attaches it with :func:`ingest_completed`.

It matches runs of the ``ingest`` flow that belong to the ``ingest`` deployment: ad-hoc
``mmrag ingest`` runs (which may target another database) and ingest flows called as
subflows (a subflow run has no deployment) do not trigger it.
"""

from __future__ import annotations

INGEST_COMPLETED: dict = {
    "type": "event",
    "enabled": True,
    "match": {"prefect.resource.id": "prefect.flow-run.*"},
    "expect": ["prefect.flow-run.Completed"],
    "match_related": [
        {"prefect.resource.role": "flow", "prefect.resource.name": "ingest"},
        {"prefect.resource.role": "deployment", "prefect.resource.name": "ingest"},
    ],
}


def ingest_completed():
    """``INGEST_COMPLETED`` as the object ``flow.to_deployment(triggers=[...])`` takes."""
    from prefect.events import DeploymentEventTrigger

    return DeploymentEventTrigger.model_validate(INGEST_COMPLETED)
