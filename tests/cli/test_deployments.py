"""Scheduling and operations: ``deployments/prefect.yaml`` against a real Prefect server and a
process worker, the ingest → query trigger, progress artifacts, ``mmrag status`` and
``mmrag serve``'s refusal without a server.

Everything started here (server, worker) runs in its own process group and is stopped in the
fixture teardown: SIGTERM, then SIGKILL after a timeout.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml
from conftest import tables as tables_of

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
YAML = REPO / "deployments" / "prefect.yaml"
MMRAG = [sys.executable, "-m", "mmrag.cli"]
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


# ---------------------------------------------------------------- fast: yaml, status, serve

def test_yaml_trigger_matches_the_python_one():
    from deployments.triggers import INGEST_COMPLETED, ingest_completed

    spec = yaml.safe_load(YAML.read_text())
    by_name = {d["name"]: d for d in spec["deployments"]}
    assert set(by_name) == {"ingest", "query", "backfill", "evaluate", "finetune"}
    assert by_name["query"]["triggers"] == [INGEST_COMPLETED]
    assert ingest_completed().expect == {"prefect.flow-run.Completed"}
    assert by_name["backfill"]["schedules"] == [] == by_name["finetune"]["schedules"]
    for d in by_name.values():
        module, name = d["entrypoint"].split(":")
        assert (REPO / module).exists(), d["entrypoint"]
        flow = getattr(importlib.import_module(module[:-3].replace("/", ".")), name)
        params = inspect.signature(flow.fn).parameters
        assert set(d["parameters"]) <= set(params), (d["name"], d["parameters"])


def test_flow_parameters_render_as_a_form():
    from prefect.utilities.callables import parameter_schema

    from flows.ingest import ingest_flow

    schema = parameter_schema(ingest_flow).model_dump()
    assert schema["required"] == ["source"]
    settings = schema["definitions"]["Settings"]["properties"]
    assert settings["profile"]["enum"] == ["default", "tiny"]
    assert settings["batch_size"]["minimum"] == 1


def test_progress_artifact_is_throttled_and_never_fails_the_step(monkeypatch):
    import logging

    import prefect.artifacts as artifacts

    from flows import progress as prog

    calls = []
    monkeypatch.setattr(artifacts, "create_progress_artifact",
                        lambda pct, key, description: calls.append(("create", pct, key)) or "id")
    monkeypatch.setattr(artifacts, "update_progress_artifact",
                        lambda aid, pct, description: calls.append(("update", pct, description)))
    log = logging.getLogger("test")
    assert not prog.in_prefect_run()
    with prog.progress(10, "gen", log) as advance:  # outside a run: no artifact at all
        advance(10)
    assert calls == []
    with prog.progress(10, "Gen Step", log, artifact=True) as advance:
        for _ in range(9):
            advance(1)  # throttled: nothing until 2 s pass or the total is reached
    assert calls == [("create", 0.0, "gen-step-progress"),
                     ("update", 100.0, "Gen Step: done (9/10)")]

    def broken(*a, **k):
        raise RuntimeError("api down")

    monkeypatch.setattr(artifacts, "create_progress_artifact", broken)
    with prog.progress(3, "x", log, artifact=True) as advance:
        advance(3)


def _status(args, db, out) -> tuple[int, str]:
    from typer.testing import CliRunner

    from mmrag.cli import app

    r = CliRunner().invoke(app, ["--db", str(db), "status", "--out", str(out), *args])
    return r.exit_code, r.output


def test_status_on_a_missing_db_says_so_and_creates_nothing(tmp_path):
    code, text = _status([], tmp_path / "db", tmp_path / "out")
    assert code == 0, text
    assert f"no database at {tmp_path / 'db'} yet" in text and "no answers under" in text
    assert not (tmp_path / "db").exists()
    code, text = _status(["--json"], tmp_path / "db", tmp_path / "out")
    report = json.loads(text)
    assert report["db"]["exists"] is False and report["answers"]["partitions"] == []


@pytest.mark.slow
def test_status_of_an_ingested_db(tmp_path, settings, sample_dump, ray_session):
    import shutil

    import pyarrow as pa
    import pyarrow.parquet as pq

    from flows.ingest import ingest_flow
    from mmrag.samples.dump import write_bad_inputs

    dump = tmp_path / "dump"
    shutil.copytree(sample_dump, dump)
    write_bad_inputs(dump, tmp_path / "outside")
    summary = ingest_flow.fn(str(dump), settings)
    answers = tmp_path / "out" / "answers" / "run_date=2026-01-02"
    answers.mkdir(parents=True)
    pq.write_table(pa.table({"query_id": ["a", "b", "c"]}), answers / "r1.parquet")
    (answers / ".r2.parquet.tmp").write_text("half-written")
    code, text = _status(["--json"], settings.db, tmp_path / "out")
    assert code == 0, text
    report = json.loads(text)
    tables = {t["name"]: t for t in report["db"]["tables"]}
    assert tables["images"]["rows"] == summary["ingested"] and tables["images"]["version"] > 1
    assert {i["type"] for i in tables["images"]["indices"]} >= {"FTS", "BTree"}
    assert all(i["unindexed_rows"] == 0 for i in tables["images"]["indices"])
    stages = {r["stage"]: r["rows"] for r in report["db"]["rejects"]}
    rejects = tables_of(settings.db)["rejects"]  # one row per (file, stage), reasons joined
    assert stages == dict(rejects.group_by("stage").len().iter_rows())
    assert set(stages) == {k for k, v in summary["rejected"].items() if v}
    [run] = report["db"]["runs"]
    assert run["run_id"] == summary["run_id"] and run["images"] == summary["ingested"]
    assert run["last_at"].startswith("20")
    assert report["answers"]["partitions"] == [
        {"run_date": "2026-01-02", "files": 1, "rows": 3, "runs": ["r1"]}]
    code, text = _status([], settings.db, tmp_path / "out")
    assert code == 0 and "rejects by stage" in text and summary["run_id"] in text


def _clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API_")}
    return env | {"PREFECT_SERVER_ANALYTICS_ENABLED": "false"} | extra


def test_serve_refuses_without_a_prefect_server(tmp_path):
    r = subprocess.run(MMRAG + ["serve", "--source", str(tmp_path)], capture_output=True,
                       text=True, timeout=120, env=_clean_env(PREFECT_HOME=str(tmp_path / "ph")))
    assert r.returncode == 2
    [line] = r.stderr.strip().splitlines()
    assert line.startswith("error: mmrag serve needs a Prefect server")
    assert "PREFECT_API_URL" in line


# ---------------------------------------------------------------- a real server and worker

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(args, log: Path, env: dict, cwd: Path = REPO) -> subprocess.Popen:
    """A background process in its own session, so its whole group can be stopped."""
    with log.open("wb") as out:
        return subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                start_new_session=True)


def _stop(proc: subprocess.Popen, timeout: float = 20) -> None:
    """SIGTERM the process group, SIGKILL it when it does not exit in time."""
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
        except subprocess.TimeoutExpired:
            continue
        # the leader is gone; make sure nothing of its group survives it
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        return


def _wait(check, timeout: float, what: str, every: float = 1.0, logs: tuple = ()):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        found = check()
        if found:
            return found
        time.sleep(every)
    tails = "\n".join(f"--- {p}\n{p.read_text(errors='replace')[-4000:]}" for p in logs)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}\n{tails}")


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory):
    """``prefect server start`` on a free loopback port, with its own PREFECT_HOME."""
    home = tmp_path_factory.mktemp("prefect-server")
    port = _free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = _clean_env(PREFECT_HOME=str(home), PREFECT_UI_ENABLED="false",
                     PREFECT_SERVER_LOGGING_LEVEL="WARNING")
    log = home / "server.log"
    began = time.monotonic()
    proc = _start([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1",
                   "--port", str(port)], log, env)
    try:
        def healthy():
            assert proc.poll() is None, log.read_text()[-3000:]
            try:
                return httpx.get(f"{url}/health", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        _wait(healthy, 120, "the Prefect server", logs=(log,))
        print(f"prefect server ready in {time.monotonic() - began:.1f} s")
        yield {"url": url, "home": home, "log": log}
    finally:
        _stop(proc)


def _api(server, method: str, path: str, **kw):
    r = httpx.request(method, server["url"] + path, timeout=30, **kw)
    r.raise_for_status()
    return r.json()


def _cli(args, env: dict, timeout: float = 180) -> str:
    r = subprocess.run([str(BIN / "prefect"), "--no-prompt", *args], capture_output=True,
                       text=True, timeout=timeout, cwd=REPO, env=env)
    assert r.returncode == 0, f"prefect {args}: {r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r.stdout


def _run_state(server, run_id: str) -> str | None:
    state = _api(server, "GET", f"/flow_runs/{run_id}").get("state") or {}
    return state.get("type")


def _wait_done(server, run_id: str, timeout: float, logs: tuple) -> None:
    state = _wait(lambda: (s := _run_state(server, run_id)) in TERMINAL and s, timeout,
                  f"flow run {run_id}", every=2, logs=logs)
    assert state == "COMPLETED", f"flow run {run_id} ended {state}"


@pytest.fixture
def deploy_env(prefect_server, tmp_path, cache_dir):
    """What a worker host sets: the server, the checkout, the per-install paths and settings."""
    from mmrag.samples.dump import generate_sample_dump

    generate_sample_dump(tmp_path / "dump", 8, seed=3)
    queries = tmp_path / "q.jsonl"
    queries.write_text('{"query_id": "q1", "text": "a quiet street"}\n'
                       '{"query_id": "q2", "text": "shops", "top_k": 3}\n')
    return _clean_env(
        PREFECT_API_URL=prefect_server["url"], PREFECT_HOME=str(tmp_path / "prefect-client"),
        PREFECT_WORKER_QUERY_SECONDS="2", PREFECT_WORKER_PREFETCH_SECONDS="5",
        MMRAG_REPO=str(REPO), MMRAG_DUMP_ROOT=str(tmp_path / "dump"),
        MMRAG_QUERIES=str(queries), MMRAG_PROFILE="tiny", MMRAG_DB=str(tmp_path / "db"),
        MMRAG_OUT=str(tmp_path / "out"), MMRAG_WORK_DIR=str(tmp_path / "work"),
        MMRAG_CACHE_DIR=str(cache_dir), MMRAG_ENGINE="none", MMRAG_EMBED_ACTOR_CPUS="0.5",
        MMRAG_DECODE_CPUS="0.25", MMRAG_RAY_NUM_CPUS="2")


@contextlib.contextmanager
def _worker(env: dict, log: Path):
    """``prefect worker start`` for the pool, stopped (SIGTERM, then SIGKILL) on the way out."""
    proc = _start([str(BIN / "prefect"), "worker", "start", "--pool", "mmrag"], log, env)
    try:
        yield log
    finally:
        _stop(proc, timeout=30)


@pytest.mark.slow
def test_deploy_run_ingest_then_trigger_fires_query(prefect_server, deploy_env, tmp_path):
    t0 = time.monotonic()
    _cli(["work-pool", "create", "mmrag", "--type", "process"], deploy_env)
    # MMRAG_REPO unset while deploying: the pull step keeps the placeholder and the worker
    # fills it in when a run starts (set while deploying, it would be recorded instead)
    deploy_only = {k: v for k, v in deploy_env.items() if k != "MMRAG_REPO"}
    _cli(["deploy", "--all", "--prefect-file", str(YAML)], deploy_only)
    t_deploy = time.monotonic() - t0
    deps = {d["name"]: d for d in _api(prefect_server, "POST", "/deployments/filter", json={})}
    assert set(deps) == {"ingest", "query", "backfill", "evaluate", "finetune"}
    _check_deployments(prefect_server, deps, deploy_env)
    with _worker(deploy_env, tmp_path / "worker.log") as log:
        _run_ingest_then_query(prefect_server, deploy_env, deps, (log, prefect_server["log"]))
    print(f"deploy {t_deploy:.1f} s, deploy + both runs {time.monotonic() - t0:.1f} s")


def _run_ingest_then_query(server, env: dict, deps: dict, logs: tuple) -> None:
    """Run ingest with a settings form value; the trigger must start query once it completes."""
    import lancedb

    t0 = time.monotonic()
    earlier = {r["id"] for r in _query_runs(server, deps)}
    settings = {"profile": "tiny", "db": env["MMRAG_DB"], "embed_actor_cpus": 0.5,
                "decode_cpus": 0.25, "cache_dir": env["MMRAG_CACHE_DIR"],
                "work_dir": env["MMRAG_WORK_DIR"]}
    out = _cli(["deployment", "run", "ingest/ingest", "--param",
                f"settings={json.dumps(settings)}"], env)
    ingest_id = re.search(r"UUID: ([0-9a-f-]{36})", out).group(1)
    _wait_done(server, ingest_id, 150, logs)
    t_ingest = time.monotonic() - t0
    assert lancedb.connect(env["MMRAG_DB"]).open_table("images").count_rows() == 8

    def triggered():  # not a scheduled run (their idempotency key says so), not an older one
        return [r for r in _query_runs(server, deps) if r["id"] not in earlier
                and not (r.get("idempotency_key") or "scheduled").startswith("scheduled")]

    [query_run] = _wait(triggered, 60, "a query run triggered by the ingest", every=2, logs=logs)
    _wait_done(server, query_run["id"], 120, logs)
    answers = list((Path(env["MMRAG_OUT"]) / "answers").glob("run_date=*/*.parquet"))
    assert len(answers) == 1 and answers[0].stem == query_run["id"]
    _check_progress_artifacts(server, ingest_id, query_run["id"])
    print(f"ingest run done {t_ingest:.1f} s, triggered query done "
          f"{time.monotonic() - t0:.1f} s after the run was requested")


def _query_runs(server, deps: dict) -> list[dict]:
    return _api(server, "POST", "/flow_runs/filter", json={
        "deployments": {"id": {"any_": [deps["query"]["id"]]}}})


def _check_deployments(server, deps: dict, env: dict) -> None:
    """Schedules, default parameters and the form schema, as the UI will show them."""
    ingest, query = deps["ingest"], deps["query"]
    assert ingest["parameters"] == {"source": env["MMRAG_DUMP_ROOT"]}
    assert query["parameters"] == {"queries": env["MMRAG_QUERIES"]}
    assert [s["schedule"]["interval"] for s in ingest["schedules"]] == [3600]
    assert [s["schedule"]["cron"] for s in query["schedules"]] == ["0 6 * * *"]
    assert deps["backfill"]["schedules"] == [] == deps["finetune"]["schedules"]
    assert [s["schedule"]["cron"] for s in deps["evaluate"]["schedules"]] == ["0 7 * * 1"]
    assert deps["evaluate"]["parameters"] == {"sample": 500}
    assert "Settings" in json.dumps(ingest["parameter_openapi_schema"])
    assert ingest["pull_steps"][0]["prefect.deployments.steps.set_working_directory"] == {
        "directory": "{{ $MMRAG_REPO }}"}
    automations = _api(server, "POST", "/automations/filter", json={})
    assert any(a["actions"][0].get("deployment_id") == query["id"] and
               a["trigger"]["expect"] == ["prefect.flow-run.Completed"] for a in automations)
    # the hourly schedule starts one interval after the deploy: nothing due during this test
    scheduled = _api(server, "POST", "/flow_runs/filter", json={
        "deployments": {"id": {"any_": [ingest["id"]]}}})
    assert all(r["state"]["type"] == "SCHEDULED" for r in scheduled)


def _check_progress_artifacts(server, *run_ids: str) -> None:
    arts = _api(server, "POST", "/artifacts/filter", json={"artifacts": {"type": {
        "any_": ["progress"]}}})
    by_key = {a["key"]: a for a in arts if a["flow_run_id"] in run_ids}
    assert set(by_key) >= {"ingest-progress", "generate-progress"}, arts
    assert all(float(a["data"]) == 100.0 for a in by_key.values())


@pytest.mark.slow
@pytest.mark.extended
def test_mmrag_serve_runs_ingest_and_the_triggered_query(prefect_server, deploy_env, tmp_path):
    """The one-command alternative: no work pool, no worker; runs execute under ``mmrag serve``
    with its environment (the same deployment names, so the same trigger applies)."""
    env = deploy_env | {"MMRAG_DB": str(tmp_path / "serve-db"),
                        "MMRAG_OUT": str(tmp_path / "serve-out")}
    log = tmp_path / "serve.log"
    serve = MMRAG + ["serve", "--interval", "3600", "--cron", "0 6 * * *"]
    _no_pool_deployments(prefect_server, serve, env)
    t0 = time.monotonic()
    proc = _start(serve, log, env)
    try:
        def served():
            deps = _api(prefect_server, "POST", "/deployments/filter", json={})
            mine = {d["name"]: d for d in deps
                    if (d["description"] or "").startswith("mmrag serve")}
            return mine if set(mine) == {"ingest", "query"} else None

        deps = _wait(served, 120, "mmrag serve's deployments", logs=(log,))
        assert deps["ingest"]["parameters"] == {"source": env["MMRAG_DUMP_ROOT"]}
        print(f"mmrag serve ready in {time.monotonic() - t0:.1f} s")
        _run_ingest_then_query(prefect_server, env, deps, (log, prefect_server["log"]))
    finally:
        _stop(proc, timeout=30)


def _no_pool_deployments(server, serve: list[str], env: dict) -> None:
    """Serve refuses to take over the work-pool deployments of the yaml (when the test above
    made them): their runs would crash. Once they are deleted it may start."""
    pooled = [d for d in _api(server, "POST", "/deployments/filter", json={})
              if d["work_pool_name"]]
    if not pooled:
        return
    r = subprocess.run(serve, capture_output=True, text=True, timeout=120, env=env, cwd=REPO)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "runs on work pool 'mmrag'" in r.stderr.strip().splitlines()[-1]
    for d in pooled:
        httpx.delete(f"{server['url']}/deployments/{d['id']}", timeout=30).raise_for_status()
