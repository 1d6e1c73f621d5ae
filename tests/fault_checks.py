"""Shared by the fault tests: a small dump, the rows any complete ingest of it must hold, and
row-by-row checks of the three tables (expected values derived from the dump's own bytes)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from contextlib import contextmanager, suppress
from pathlib import Path

import numpy as np
import prefect.main  # noqa: F401 - see below
import pytest
from conftest import tables

# Prefect binds its console log handler to ``sys.stderr`` when it is first imported: import it
# while collecting, never first inside a CliRunner call, whose streams close after the call.

RUNNER = str(Path(__file__).with_name("fault_runner.py"))
SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
COMMIT_ROWS = 8


#: files of a fault dump rejected while planning (never read): the two non-UTF-8 names
PLAN_REJECTS = 2


def make_fault_dump(root: Path, n: int, seed: int = 5) -> Path:
    """n small JPEGs, a byte-identical copy of the first (a duplicate), a truncated JPEG, and
    two good JPEGs whose names are not UTF-8 (a Latin-1 file name and a Latin-1 folder)."""
    from mmrag.samples.dump import generate_sample_dump

    records = generate_sample_dump(root, n, seed=seed, size=(320, 240))
    first = root / records[0]["Relative Path"].replace("\\", "/")
    shutil.copy(first, root / "copy_of_first.jpg")
    data = first.read_bytes()
    (root / "truncated.jpg").write_bytes(data[: len(data) // 3])
    second = root / records[1]["Relative Path"].replace("\\", "/")
    latin1_dir = os.path.join(os.fsencode(root), b"d\xe9j\xe0")
    os.makedirs(latin1_dir)
    for name in (os.path.join(os.fsencode(root), b"caf\xe9.jpg"),
                 os.path.join(latin1_dir, b"vu.jpg")):
        with open(name, "wb") as f:
            f.write(second.read_bytes() + b"\0")  # new bytes: only the name is wrong
    return root


def printable(path: str) -> str:
    """How a non-UTF-8 path is recorded: its bytes as ``\\xNN`` escapes."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def expected_rows(dump: Path) -> dict:
    """What any complete ingest of a ``make_fault_dump`` folder must hold."""
    files, images, rejects = {}, {}, {}
    for path in sorted(Path(dump).rglob("*")):
        if path.suffix.lower() not in SUFFIXES:
            continue
        uri = printable(os.path.realpath(path))
        if uri != os.path.realpath(path):
            files[uri], rejects[(uri, "path")] = None, True
            continue
        digest = None if path.name == "truncated.jpg" else hashlib.sha256(
            path.read_bytes()).hexdigest()
        files[uri] = digest
        if digest:
            images.setdefault(digest, set()).add(uri)
        else:
            rejects[(uri, "decode")] = True
    meta = json.loads((Path(dump) / "metadata.json").read_text())
    captions = {os.path.realpath(dump / r["Relative Path"].replace("\\", "/")):
                "\n".join(r["Caption"]) for r in meta}
    return {"files": files, "images": images, "captions": captions, "rejects": set(rejects)}


def assert_consistent(db: str) -> dict:
    """What must hold at ANY moment, even right after a kill: no duplicate keys, and no
    ledger row pointing at an image that is not stored (the ledger is written last)."""
    t = tables(db)
    assert t["images"]["image_id"].is_duplicated().sum() == 0
    assert t["files"]["source_uri"].is_duplicated().sum() == 0
    assert t["rejects"].select("source_uri", "stage").is_duplicated().sum() == 0
    pointed = set(t["files"]["image_id"].drop_nulls())
    assert pointed <= set(t["images"]["image_id"]), "ledger row without its image"
    return t


def assert_exactly(db: str, want: dict) -> dict:
    """Row by row: every file once with its content hash, every distinct content once with a
    full vector and its introducer's metadata, statuses and rejects as the dump implies."""
    t = assert_consistent(db)
    assert dict(t["files"].select("source_uri", "image_id").iter_rows()) == want["files"]
    assert set(t["images"]["image_id"]) == set(want["images"])
    for image_id, uri in t["images"].select("image_id", "source_uri").iter_rows():
        assert uri in want["images"][image_id]  # stored by a file that holds these bytes
    introducer = dict(t["images"].select("source_uri", "image_id").iter_rows())
    for uri, status in t["files"].select("source_uri", "status").iter_rows():
        digest = want["files"][uri]
        assert status == ("rejected" if digest is None else
                          "ingested" if introducer.get(uri) == digest else "duplicate"), uri
    assert set(t["rejects"].select("source_uri", "stage").iter_rows()) == want["rejects"]
    norms = np.linalg.norm(t["images"]["vector"].to_numpy(), axis=1)
    assert np.allclose(norms, 1.0, atol=1e-3), "a stored vector is not a full CLIP embedding"
    for uri, caption in t["images"].select("source_uri", "caption").iter_rows():
        assert caption == want["captions"].get(uri), uri
    return t


def runner_env(settings, ray_session, counter: Path, **extra: str) -> dict:
    """The faulty run's environment: the test's settings; its driver joins the session Ray."""
    return os.environ | {
        "MMRAG_DB": settings.db, "MMRAG_PROFILE": "tiny", "MMRAG_CACHE_DIR": settings.cache_dir,
        "MMRAG_WORK_DIR": settings.work_dir, "MMRAG_OUT": settings.out,
        "MMRAG_COMMIT_ROWS": str(COMMIT_ROWS), "MMRAG_BATCH_SIZE": "8",
        "MMRAG_DECODE_BATCH_SIZE": "4", "MMRAG_EMBED_ACTOR_CPUS": "0.5",
        "MMRAG_DECODE_CPUS": "0.25", "FAULT_COUNTER": str(counter),
        "MMRAG_RAY_ADDRESS": ray_session.get_runtime_context().gcs_address,
    } | extra


def start_runner(args: list[str], env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, RUNNER, *args], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def run_runner(args: list[str], env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, RUNNER, *args], env=env, capture_output=True,
                          text=True, timeout=timeout)


def cli(args: list[str], monkeypatch, **env: str):
    """``mmrag ARGS`` in-process (real Prefect, the session's Ray); exceptions propagate, so a
    traceback instead of a clean exit fails the test."""
    from typer.testing import CliRunner

    from mmrag.cli import app

    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return CliRunner().invoke(app, args, catch_exceptions=False)


def one_line_error(result) -> str:
    """Exit code 2 and exactly one ``error:`` line, the last thing the CLI printed."""
    lines = result.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("error:")]
    assert result.exit_code == 2, result.output[-3000:]
    assert len(errors) == 1 and lines[-1] == errors[0], lines[-5:]
    return errors[0]


@contextmanager
def tmpfs(path: Path, size: str = "16m"):
    """A small real filesystem (ENOSPC and read-only for real); None where mount is refused."""
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True)
    try:
        yield path if done.returncode == 0 else None
    finally:
        if done.returncode == 0:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)


def fail_answers_writes(monkeypatch, error: Exception) -> None:
    """Writing an answers file (its hidden temp file in a ``run_date=`` partition) raises
    ``error``; the other files of the run (and the writability probe) are written as usual."""
    real = Path.write_bytes

    def write_bytes(self, data):
        if self.parent.name.startswith("run_date=") and ".parquet." in self.name:
            raise error
        return real(self, data)

    monkeypatch.setattr(Path, "write_bytes", write_bytes)


def fill(folder: Path) -> None:
    """Use up every free byte of the filesystem holding ``folder``."""
    with open(folder / "filler", "wb", buffering=0) as f:
        for block in (65536, 1):
            with suppress(OSError):
                while True:
                    f.write(b"\0" * block)


@pytest.fixture(scope="session", autouse=True)
def stop_ephemeral_prefect():
    """In-process CLI runs start Prefect's ephemeral server; stop it while pytest still
    captures output (at interpreter exit its log line would hit a closed stream)."""
    yield
    from prefect.server.api.server import SubprocessASGIServer

    SubprocessASGIServer().stop()
