"""Security posture: no unsafe deserialisation or code evaluation in production code, and
credentials never reach logs, summaries, Prefect artifacts or stored rows."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from fault_checks import cli, stop_ephemeral_prefect  # noqa: F401 - autouse

ROOT = Path(__file__).resolve().parents[2]
PRODUCTION = ("flows", "tasks", "schemas", "mmrag")
UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "marshal", "shelve",
                  "jsonpickle"}


def _dotted(node: ast.AST) -> str:
    """``a.b.c`` for a call target (empty for anything dynamic)."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        inner = _dotted(node.value)
        return f"{inner}.{node.attr}" if inner else ""
    return ""


def _kw(call: ast.Call, name: str):
    for k in call.keywords:
        if k.arg == name:
            return k.value
    return None


def _is_true(node) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def unsafe_calls(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, why) for every construct that could execute data as code."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import | ast.ImportFrom):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""]
            found += [(node.lineno, f"imports {n}") for n in names
                      if n.split(".")[-1] in UNSAFE_MODULES]
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        last = name.rsplit(".", 1)[-1]
        if isinstance(node.func, ast.Name) and name in ("eval", "exec", "compile", "__import__"):
            if name != "__import__" or not isinstance(node.args[0], ast.Constant):
                found.append((node.lineno, f"{name}() of a computed value"))
        elif name == "torch.load" and not _is_true(_kw(node, "weights_only")):
            found.append((node.lineno, "torch.load without weights_only=True"))
        elif name in ("yaml.load", "yaml.load_all") and "Safe" not in ast.unparse(
                _kw(node, "Loader") or (node.args[1] if len(node.args) > 1 else ast.Constant(""))):
            found.append((node.lineno, f"{name} without SafeLoader"))
        elif name in ("yaml.unsafe_load", "yaml.full_load") or last == "read_pickle":
            found.append((node.lineno, name))
        elif last == "load" and _is_true(_kw(node, "allow_pickle")):
            found.append((node.lineno, "numpy load with allow_pickle=True"))
        elif _is_true(_kw(node, "trust_remote_code")):
            found.append((node.lineno, f"{name}(trust_remote_code=True)"))
    return found


@pytest.mark.parametrize("snippet", [
    "import pickle", "from dill import loads", "eval(text)", "exec(code)", "torch.load(p)",
    "torch.load(p, weights_only=False)", "yaml.load(s)", "yaml.load(s, Loader=yaml.Loader)",
    "yaml.unsafe_load(s)", "np.load(p, allow_pickle=True)", "pd.read_pickle(p)",
    "AutoModel.from_pretrained(m, trust_remote_code=True)", "__import__(name)",
])
def test_the_scanner_catches_each_unsafe_construct(snippet):
    assert unsafe_calls(ast.parse(snippet)), snippet


@pytest.mark.parametrize("snippet", [
    "model.eval()", "torch.load(p, weights_only=True)", "yaml.load(s, Loader=yaml.SafeLoader)",
    "yaml.safe_load(s)", "np.load(p)", "__import__('json')", "json.loads(s)",
])
def test_the_scanner_passes_safe_code(snippet):
    assert unsafe_calls(ast.parse(snippet)) == [], snippet


def test_production_code_never_deserialises_or_evaluates_data():
    files = sorted(p for d in PRODUCTION for p in (ROOT / d).rglob("*.py"))
    assert len(files) > 20
    problems = [f"{f.relative_to(ROOT)}:{line}: {why}" for f in files
                for line, why in unsafe_calls(ast.parse(f.read_text(), str(f)))]
    assert problems == []


SECRET = "fake-secret-key-DO-NOT-LOG-5b1e7c"
TOKEN = "fake-session-token-DO-NOT-LOG-91d0"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "AKIAFAKEFAKEFAKE0000", "AWS_SECRET_ACCESS_KEY": SECRET,
               "AWS_SESSION_TOKEN": TOKEN}


def _leaks(text: str | bytes) -> list[str]:
    text = text if isinstance(text, bytes) else text.encode("utf-8", "replace")
    return [s for s in (SECRET, TOKEN) if s.encode() in text]


@pytest.fixture
def unreachable_s3(monkeypatch):
    """Credentials in the environment, an S3 endpoint where nothing listens."""
    from flows.config import storage
    from mmrag.settings import Settings

    for key, value in CREDENTIALS.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("MMRAG_S3_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("MMRAG_S3_ALLOW_HTTP", "true")
    settings = Settings()
    config = storage(settings)
    assert config.secret_key == SECRET and config.session_token == TOKEN  # really carried
    return settings, config


def test_storage_config_and_source_errors_never_show_credentials(unreachable_s3):
    """repr, settings dumps and the error of an unreachable S3 dump hide the secret."""
    from tasks.ingest.discover import SourceError, open_source

    settings, config = unreachable_s3
    messages = [repr(config), str(config), repr(settings), settings.model_dump_json()]
    with pytest.raises(SourceError) as error:
        open_source("s3://bucket/dump", config)
    assert "cannot open SOURCE s3://bucket/dump" in str(error.value)
    assert [m for m in messages + [str(error.value)] if _leaks(m)] == []


@pytest.mark.slow
def test_lancedb_errors_never_show_credentials(unreachable_s3):
    """LanceDB gets the secret in its storage options; its error (after ~5 s of retries)
    must not echo them."""
    from tasks.io import store

    _, config = unreachable_s3
    with pytest.raises(store.StoreError) as error:
        store.open_tables("s3://bucket/db", 64, "m/p", storage=config)
    assert "cannot open LanceDB at s3://bucket/db" in str(error.value)
    assert _leaks(str(error.value)) == []


@pytest.mark.slow
def test_credentials_never_reach_logs_summaries_or_artifacts(
        tmp_path, sample_dump, settings, ray_session, monkeypatch, caplog, capfd):
    """Ingest + query through the CLI (real Prefect, real Ray) with credentials in the
    environment (they travel to the Ray decode tasks): no trace of them in the CLI output,
    Python logs, Prefect run logs, flow-run parameters, artifacts, Ray's log files, the
    tables or the answers."""
    import json
    import logging

    from prefect.client.orchestration import get_client
    from prefect.logging.handlers import APILogWorker

    caplog.set_level(logging.DEBUG)
    env = CREDENTIALS | {
        "MMRAG_S3_REGION": "eu-test-1", "MMRAG_PROFILE": "tiny", "MMRAG_DB": settings.db,
        "MMRAG_CACHE_DIR": settings.cache_dir, "MMRAG_WORK_DIR": settings.work_dir,
        "MMRAG_EMBED_ACTOR_CPUS": "0.5", "MMRAG_DECODE_CPUS": "0.25"}
    ingested = cli(["ingest", str(sample_dump)], monkeypatch, **env)
    assert ingested.exit_code == 0, ingested.output[-3000:]
    queries = tmp_path / "q.jsonl"
    queries.write_text(json.dumps({"query_id": "s", "text": "a street", "top_k": 2}) + "\n")
    out = tmp_path / "out"
    answered = cli(["query", str(queries), "--engine", "none", "--run-id", "secrets",
                    "--out", str(out)], monkeypatch, **env)
    assert answered.exit_code == 0, answered.output[-3000:]

    APILogWorker.drain_all(timeout=10)
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(limit=200)
        prefect_texts = [json.dumps(r.parameters, default=str) for r in runs]
        prefect_texts += [log.message for log in client.read_logs(limit=200)]
        artifacts = client.read_artifacts(limit=200)
    keys = {a.key for a in artifacts}
    assert {"ingest-summary", "query-summary"} <= keys
    prefect_texts += [json.dumps(a.data, default=str) + str(a.description) for a in artifacts]
    captured = capfd.readouterr()
    texts = [ingested.output, answered.output, caplog.text, captured.out, captured.err,
             *prefect_texts]
    assert [t[:200] for t in texts if _leaks(t)] == []
    ray_logs = Path(settings.cache_dir) / "ray" / "session_latest" / "logs"
    stored = [Path(settings.db), out, Path(settings.work_dir), ray_logs]
    files = [f for root in stored for f in root.rglob("*") if f.is_file()]
    assert len(files) > 10
    assert [str(f) for f in files if _leaks(f.read_bytes())] == []
