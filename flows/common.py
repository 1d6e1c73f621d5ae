"""Prefect glue shared by the flows: the same body runs inside a flow run and under ``.fn()``."""

from __future__ import annotations

import logging
import uuid

from prefect import get_run_logger


def logger(name: str = "mmrag"):
    """The run logger inside Prefect; a plain logger when called via ``.fn()`` in tests."""
    try:
        return get_run_logger()
    except Exception:  # noqa: BLE001 - MissingContextError outside a run
        return logging.getLogger(name)


def in_flow_run() -> bool:
    from prefect.context import FlowRunContext

    return FlowRunContext.get() is not None


def call(task_, *args):
    """Run as a Prefect task inside a flow run; as the plain function under ``.fn()``."""
    return task_(*args) if in_flow_run() else task_.fn(*args)


def run_id() -> str:
    """The Prefect flow-run id when there is one, so runs and table rows can be matched."""
    from prefect.runtime import flow_run

    return str(flow_run.id or uuid.uuid4())
