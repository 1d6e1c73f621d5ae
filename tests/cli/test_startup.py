"""Prefect's temporary server starts in a thread while the command warms its own workers."""

from __future__ import annotations

import threading

import pytest
from prefect.settings import PREFECT_API_URL, temporary_settings

from mmrag.cli.startup import prefect_server_in_background, temporary_server_needed


@pytest.fixture
def no_api_url():
    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        yield


def test_the_server_starts_while_the_block_runs(no_api_url):
    """The block waits for the start and the start waits for the block: run one after the
    other, this would time out."""
    block_ran, started = threading.Event(), []

    def start():
        assert block_ran.wait(10), "the server start did not overlap the block"
        started.append(threading.current_thread().name)

    assert temporary_server_needed()
    with prefect_server_in_background(start):
        block_ran.set()
    assert started == ["prefect-server-start"], "leaving the block waits for the start"


def test_a_failed_start_is_raised_in_the_caller(no_api_url):
    def start():
        raise RuntimeError("Timed out while attempting to connect to ephemeral Prefect API server")

    with (pytest.raises(RuntimeError, match="ephemeral Prefect API server"),
          prefect_server_in_background(start)):
        pass


def test_a_running_server_is_reused_and_nothing_starts():
    calls = []
    with temporary_settings(updates={PREFECT_API_URL: "http://127.0.0.1:4200/api"}):
        assert not temporary_server_needed()
        with prefect_server_in_background(lambda: calls.append(1)):
            pass
    assert calls == []
