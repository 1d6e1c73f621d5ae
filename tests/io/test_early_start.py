"""Ray started ahead of the flow, in a thread: whatever needs Ray waits for it, a failure there
is only a warning, and the thread outlives its work (Ray's daemons die with the thread that
started them)."""

from __future__ import annotations

import ctypes
import logging
import signal
import subprocess
import sys
import threading
import time

import pytest

from tasks.ingest import prestart
from tasks.io import cluster


def _slow(flag: list, seconds: float = 0.5):
    def work():
        time.sleep(seconds)
        flag.append("done")
    return work


def test_init_ray_waits_for_an_early_start_under_way(monkeypatch):
    import ray

    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    flag = []
    cluster.start_early(_slow(flag))
    assert flag == [], "the early start runs in the background"
    cluster.init_ray(cluster.RayConfig())
    assert flag == ["done"], "init_ray returned before the early start had finished"


def test_a_failed_early_start_is_a_warning_and_nothing_waits_on_it(caplog):
    def boom():
        raise RuntimeError("no room for Ray's object store")

    with caplog.at_level(logging.WARNING, logger="tasks.io.cluster"):
        cluster.start_early(boom)
        cluster.wait_early()
    assert "no room for Ray's object store" in caplog.text
    assert "the flow starts it" in caplog.text


def test_the_pipeline_handover_waits_for_the_early_start(tmp_path):
    key = ("db", "spec", "args")
    pending = prestart.Pending(key, tmp_path / "handoff.parquet")

    def register():
        time.sleep(0.5)
        with prestart._lock:
            prestart._pending["ingest"] = pending

    cluster.start_early(register)
    assert prestart.take(key) is pending, "take looked before the early start had registered"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_children_started_with_a_parent_death_signal_outlive_the_early_work():
    libc = ctypes.CDLL(None, use_errno=True)
    children = []

    def start_child():  # as Ray starts gcs_server and raylet
        children.append(subprocess.Popen(
            ["sleep", "30"], preexec_fn=lambda: libc.prctl(1, signal.SIGKILL)))  # noqa: PLW1509

    try:
        cluster.start_early(start_child)
        cluster.wait_early()
        time.sleep(0.5)
        assert children[0].poll() is None, "the child died when the early work returned"
        assert any(t.name == "ray-early-start" for t in threading.enumerate())
    finally:
        for child in children:
            child.kill()
            child.wait()
