"""``precision=auto`` on a CPU: bf16 only where it is measured faster, the measurement kept."""

from __future__ import annotations

import json

import pytest
import torch

from tasks.models import precision


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """A clean memo and cache file; the CPU reports the bf16 flag."""
    monkeypatch.setenv("MMRAG_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(precision, "_cpu_flags", lambda: {"avx2", "avx512_bf16"})
    precision.cpu_bf16_pays.cache_clear()
    yield tmp_path
    precision.cpu_bf16_pays.cache_clear()


@pytest.mark.parametrize(("speedup", "dtype"), [(4.0, torch.bfloat16), (0.6, torch.float32),
                                                (1.1, torch.float32)])
def test_auto_follows_the_measured_speedup(fresh, monkeypatch, speedup, dtype):
    monkeypatch.setattr(precision, "bf16_speedup", lambda: speedup)
    assert precision.pick_dtype("auto", "cpu") is dtype
    assert precision.pick_dtype("fp32", "cpu") is torch.float32
    assert precision.pick_dtype("bf16", "cpu") is torch.bfloat16
    assert precision.pick_dtype("auto", "cuda") is torch.float16


def test_measured_once_per_machine_and_kept(fresh, monkeypatch):
    calls = []
    monkeypatch.setattr(precision, "bf16_speedup", lambda: calls.append(1) or 3.0)
    assert precision.cpu_bf16_pays()
    kept = json.loads((fresh / precision.CACHE_FILE).read_text())
    (key, value), = kept.items()
    assert value == 3.0 and f"torch {torch.__version__}" in key
    precision.cpu_bf16_pays.cache_clear()  # a new process reads the file, measures nothing
    assert precision.cpu_bf16_pays() and len(calls) == 1


def test_an_isa_cap_is_another_machine(fresh, monkeypatch):
    """Capping torch's instruction set (e.g. ONEDNN_MAX_CPU_ISA=AVX2) changes the answer, so it
    is measured again rather than read from the uncapped entry."""
    speedups = iter([3.0, 0.2])
    monkeypatch.setattr(precision, "bf16_speedup", lambda: next(speedups))
    assert precision.cpu_bf16_pays()
    precision.cpu_bf16_pays.cache_clear()
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert not precision.cpu_bf16_pays()
    assert len(json.loads((fresh / precision.CACHE_FILE).read_text())) == 2


def test_no_flag_no_measurement(fresh, monkeypatch):
    monkeypatch.setattr(precision, "_cpu_flags", lambda: {"avx2"})
    monkeypatch.setattr(precision, "bf16_speedup", lambda: pytest.fail("measured"))
    assert precision.pick_dtype("auto", "cpu") is torch.float32


def test_unreadable_cache_is_measured_again(fresh, monkeypatch):
    (fresh / precision.CACHE_FILE).write_text("{not json")
    monkeypatch.setattr(precision, "bf16_speedup", lambda: 2.0)
    assert precision.cpu_bf16_pays()
    assert json.loads((fresh / precision.CACHE_FILE).read_text())


def test_the_measurement_is_a_ratio_of_two_real_timings():
    speedup = precision.bf16_speedup(reps=1)
    assert 0.01 < speedup < 100
