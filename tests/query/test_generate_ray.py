"""The generate stage on Ray: engine replicas as an actor pool over retrieved rows.

Tiny LLaVA, the session's local Ray (2 CPUs: replicas reserve 0.5 each).  Actor classes that
misbehave on purpose are subclasses of the real ``Generator`` defined here and shipped to Ray
by value; everything else is the production path.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

import tasks.query.generate as gen
from schemas.answers import RETRIEVED_TYPE
from tasks.io.cluster import BATCH_RETRIES
from tasks.models.engines import EngineConfig
from tasks.models.tiny_llava import ensure_tiny_llava
from tasks.query.generate import GenerateOptions, GenerationError, generate

pytestmark = pytest.mark.slow
COUNTER = {"path": ""}  # shipped by value with the classes below


@pytest.fixture(scope="module")
def tiny(cache_dir):
    return str(ensure_tiny_llava(cache_dir))


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(3)
    paths = []
    for i in range(5):
        path = folder / f"p{i}.png"
        Image.fromarray(rng.integers(0, 255, (60 + 10 * i, 90, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    return paths


@pytest.fixture
def shipped(ray_session, tmp_path):
    """Test-module classes travel to Ray by value; a call counter file per test."""
    ray_session.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    COUNTER["path"] = str(tmp_path / "calls")
    return Path(COUNTER["path"])


def _rows(photos: list[str], questions: list[str], query_image: int | None = None) -> pa.Table:
    def hit(rank: int, path: str) -> dict:
        return {"rank": rank, "image_id": f"id{rank}", "source_uri": path, "city": "Paris",
                "caption": f"a street with trees number {rank}", "similarity": 0.5,
                "score": 0.5, "safer": 5.0}

    rows = [{"_i": i, "text": q, "image_path": None if query_image is None else photos[query_image],
             "retrieved": [hit(r, photos[(i + r) % len(photos)]) for r in range(1, 4)]}
            for i, q in enumerate(questions)]
    schema = pa.schema([("_i", pa.int64()), ("text", pa.string()), ("image_path", pa.string()),
                        ("retrieved", pa.list_(RETRIEVED_TYPE))])
    return pa.Table.from_pylist(rows, schema=schema)


QUESTIONS = ["Is it safe?", "Where is the tree?", "Which street is busy?", "a quiet road",
             "Is the city clean?", "Are there cars?", "What is green?"]


def _run(rows, engine, **opts) -> dict[int, dict]:
    options = GenerateOptions(**({"replica_cpus": 0.5, "batch_size": 2} | opts))
    return {r["_i"]: r for r in generate(rows, engine, options)}


class PidGenerator(gen.Generator):
    """Records which process answered each batch; slow enough (the tiny model answers in
    milliseconds) that a second replica gets work while the first is busy."""

    def __call__(self, batch):
        with open(COUNTER["path"], "a") as f:
            f.write(f"{os.getpid()}\n")
        time.sleep(1.0)
        return super().__call__(batch)


@pytest.mark.extended  # ~35 s; the query-flow version (tests/query) runs by default
def test_greedy_answers_are_identical_for_one_and_two_replicas(tiny, photos, shipped,
                                                                monkeypatch):
    monkeypatch.setattr(gen, "Generator", PidGenerator)
    rows = _rows(photos, QUESTIONS, query_image=0)
    engine = EngineConfig("transformers", tiny, max_new_tokens=8, batch_size=2)
    one = _run(rows, engine, replicas=1)
    pids_one = set(shipped.read_text().split())
    shipped.unlink()
    two = _run(rows, engine, replicas=2)
    assert len(pids_one) == 1 and len(set(shipped.read_text().split())) == 2
    assert sorted(one) == sorted(two) == list(range(len(QUESTIONS)))
    for i in one:
        assert one[i]["error"] is None and one[i]["gen_error"] is None
        assert one[i]["text"].encode() == two[i]["text"].encode()
        assert one[i]["prompt"] == two[i]["prompt"] and one[i]["tiles"] == two[i]["tiles"]
        assert one[i]["n_prompt_tokens"] == one[i]["counted_tokens"] <= one[i]["token_budget"]
    assert "fractions from 0 to 1" in one[1]["prompt"]  # "Where …?" asks for a region


@pytest.mark.extended  # ~35 s; tests/models/test_generate.py checks per-request seeds by default
def test_sampled_answers_do_not_depend_on_batch_or_replica(tiny, photos, ray_session):
    rows = _rows(photos, QUESTIONS)
    engine = EngineConfig("transformers", tiny, max_new_tokens=8, temperature=1.0, seed=11)
    a = _run(rows, engine, replicas=1, batch_size=1)
    b = _run(rows, engine, replicas=2, batch_size=3)
    assert {i: r["text"] for i, r in a.items()} == {i: r["text"] for i, r in b.items()}
    other = _run(rows, EngineConfig("transformers", tiny, max_new_tokens=8, temperature=1.0,
                                    seed=12), replicas=1, batch_size=3)
    assert [other[i]["text"] for i in sorted(other)] != [a[i]["text"] for i in sorted(a)]


class PoisonGenerator(gen.Generator):
    """An engine whose model call fails for any batch holding a POISON prompt."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        real = self.engine._generate_batch

        def generate_batch(batch):
            if any("POISON" in r.prompt for r in batch):
                raise RuntimeError("the model choked")
            return real(batch)
        self.engine._generate_batch = generate_batch


def test_a_failing_request_errors_only_its_row(tiny, photos, shipped, monkeypatch):
    monkeypatch.setattr(gen, "Generator", PoisonGenerator)
    questions = QUESTIONS[:3] + ["POISON here"] + QUESTIONS[3:5]
    out = _run(_rows(photos, questions), EngineConfig("transformers", tiny, max_new_tokens=4),
               batch_size=3)
    assert out[3]["gen_error"] == "RuntimeError: the model choked" and out[3]["text"] is None
    assert all(out[i]["gen_error"] is None and out[i]["text"] for i in out if i != 3)


def test_a_question_too_long_for_the_model_is_its_rows_error(tiny, photos, ray_session):
    questions = ["Is it safe?", "street " * 2000, "a quiet road"]
    engine = EngineConfig("transformers", tiny, max_new_tokens=4, max_model_len=512)
    out = _run(_rows(photos, questions), engine)
    assert out[1]["error"].startswith("question too long:") and "\n" not in out[1]["error"]
    assert out[1]["text"] is None and out[1]["n_prompt_tokens"] is None
    assert all(out[i]["text"] and out[i]["n_prompt_tokens"] <= 512 - 4 for i in (0, 2))


class DiesOnce(gen.Generator):
    """The replica's process dies on the first batch any replica gets (counted in a file)."""

    def __call__(self, batch):
        with open(COUNTER["path"], "a") as f:
            f.write(".")
        if os.path.getsize(COUNTER["path"]) == 1:
            os.kill(os.getpid(), signal.SIGKILL)
        return super().__call__(batch)


def test_a_dying_replica_is_restarted_and_its_batch_retried(tiny, photos, shipped,
                                                           monkeypatch):
    monkeypatch.setattr(gen, "Generator", DiesOnce)
    out = _run(_rows(photos, QUESTIONS[:4]), EngineConfig("transformers", tiny,
                                                           max_new_tokens=4))
    assert sorted(out) == [0, 1, 2, 3] and all(r["text"] for r in out.values())
    assert shipped.stat().st_size in (3, 4)  # 2 batches + the one (or two) in flight retried


class DiesOnPoison(gen.Generator):
    def __call__(self, batch):
        if any("POISON" in (p or "") for p in batch["prompt"].to_pylist()):
            with open(COUNTER["path"], "a") as f:
                f.write(".")
            os.kill(os.getpid(), signal.SIGKILL)
        return super().__call__(batch)


def test_a_batch_that_keeps_killing_its_replica_stops_the_run(tiny, photos, shipped,
                                                              monkeypatch):
    monkeypatch.setattr(gen, "Generator", DiesOnPoison)
    rows = _rows(photos, ["Is it safe?", "POISON", "a quiet road"])
    with pytest.raises(GenerationError, match=f"same batch {BATCH_RETRIES + 1} times"):
        _run(rows, EngineConfig("transformers", tiny, max_new_tokens=4), batch_size=1)
    assert shipped.stat().st_size == BATCH_RETRIES + 1


def test_an_engine_that_cannot_start_is_one_clear_error(tiny, photos, ray_session):
    engine = EngineConfig("transformers", tiny, adapter="/nonexistent/adapter")
    with pytest.raises(GenerationError) as err:
        _run(_rows(photos, ["Is it safe?"]), engine)
    message = str(err.value)
    assert message.startswith("the transformers engine could not start (") and "\n" not in message
    assert "adapter_config.json" in message and "/nonexistent/adapter" in message
