"""What a command starts before its flow: the ingest warm-up starts Ray early only where its check
is cheap (a local dump); the query command always starts it."""

from __future__ import annotations

from flows.early import warm_up


def test_object_store_dumps_are_not_listed_twice(settings, monkeypatch):
    calls = []
    monkeypatch.setattr("flows.early.init_ray", calls.append)
    monkeypatch.setattr("tasks.ingest.run.list_dump",
                        lambda *a, **k: calls.append("listed"))
    assert warm_up("s3://bucket/dump", settings) is False
    assert calls == [], "an object-store dump is listed once, by the plan"


def test_the_query_command_starts_ray_beside_its_flow(settings, monkeypatch):
    from flows import config, early
    from tasks.io.cluster import wait_early

    calls = []
    monkeypatch.setattr("flows.early.init_ray", calls.append)
    early.start_ray(settings)
    wait_early()
    assert calls == [config.ray(settings)]
