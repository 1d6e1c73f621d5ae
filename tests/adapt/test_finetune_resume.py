"""A fine-tune survives being killed: SIGKILL after its first checkpoint, run the same command
again, and the final adapter is bitwise the one an uninterrupted run with the same seed writes
(CPU, tiny LLaVA).  The runs are subprocesses of ``finetune_runner.py``; the same under
``torchrun`` (two DDP processes, gloo), and a run through Ray Train's ``TorchTrainer`` in the
``extended`` set."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from finetune_fixtures import write_dataset
from safetensors.torch import load_file

from tasks.adapt.finetune import FinetuneConfig, resolve_base

RUNNER = str(Path(__file__).with_name("finetune_runner.py"))
ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, cache_dir) -> Path:
    resolve_base("tiny", str(cache_dir))  # built once, before subprocesses share the cache
    return write_dataset(tmp_path_factory.mktemp("ds"))


def _env() -> dict:
    # one thread per process: the same arithmetic in every run, and no oversubscription
    return os.environ | {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def _run(cmd: list[str], log: Path) -> dict:
    with log.open("w") as out:
        proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=_env(), cwd=ROOT,
                              timeout=300)
    text = log.read_text()
    assert proc.returncode == 0, text[-3000:]
    return json.loads([line for line in text.splitlines() if line.startswith("{")][-1])


def _kill_after_first_checkpoint(cmd: list[str], out: Path, log: Path) -> None:
    """Start the run (steps slowed down), wait for checkpoint-2 to be complete, SIGKILL the
    process and all its descendants at once, like a lost node (torchrun starts its workers in
    sessions of their own, so the process group alone would leave them running)."""
    import psutil

    state = out / "checkpoints" / "checkpoint-2" / "trainer_state.json"
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=_env(), cwd=ROOT)
    deadline = time.monotonic() + 300
    while not state.is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    family = [proc.pid] + [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
    for pid in family:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL, log.read_text()[-3000:]
    psutil.wait_procs([psutil.Process(p) for p in family[1:] if psutil.pid_exists(p)],
                      timeout=60)


def _same_adapter(a: Path, b: Path) -> None:
    wa = load_file(a / "adapter" / "adapter_model.safetensors")
    wb = load_file(b / "adapter" / "adapter_model.safetensors")
    assert wa.keys() == wb.keys() and wa
    differ = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not differ, differ  # bitwise, not within a tolerance


def _check_resume(dataset: Path, tmp_path: Path, cache: str, launcher: list[str],
                  world_size: int) -> None:
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    args = [RUNNER, str(dataset)]
    first = _run([*launcher, *args, str(whole), cache], tmp_path / "whole.log")
    assert first["steps"] == 6 and first["world_size"] == world_size

    _kill_after_first_checkpoint([*launcher, *args, str(killed), cache, "1.0"], killed,
                                 tmp_path / "killed.log")
    assert not (killed / "adapter").exists() and not (killed / "finetune.json").exists()
    assert not (killed / "checkpoints" / "checkpoint-6").exists()  # killed before the end

    again = _run([*launcher, *args, str(killed), cache], tmp_path / "resumed.log")
    assert again["resumed_from"] in {str(killed / "checkpoints" / f"checkpoint-{n}")
                                     for n in (2, 4)}, again["resumed_from"]
    assert again["steps"] == 6
    assert again["losses"] == first["losses"]  # the per-step losses, restored and recomputed
    assert again["val_loss_after"] == first["val_loss_after"]
    _same_adapter(whole, killed)


def test_killed_run_resumes_to_the_same_adapter(dataset, tmp_path, cache_dir):
    _check_resume(dataset, tmp_path, str(cache_dir), [sys.executable], 1)


@pytest.mark.extended  # ~60 s on 2 cores; the single-process resume test runs by default
def test_killed_torchrun_resumes_to_the_same_adapter(dataset, tmp_path, cache_dir):
    """Two DDP processes on CPU (gloo): what several GPUs run, with RNG state per rank."""
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    _check_resume(dataset, tmp_path, str(cache_dir), [torchrun, "--nproc-per-node", "2"], 2)
    assert {p.name for p in (tmp_path / "killed" / "checkpoints" / "checkpoint-2").iterdir()} \
        >= {"rng_state_0.pth", "rng_state_1.pth", "optimizer.pt"}


@pytest.mark.extended
def test_ray_train_runs_the_same_function(dataset, tmp_path, ray_session, cache_dir):
    """Ray Train's TorchTrainer, two CPU workers: DDP through Ray, the same outputs."""
    from tasks.adapt.ray_train import finetune_on_ray

    cfg = FinetuneConfig(base="tiny", max_steps=2, batch_size=1, grad_accum=1, save_steps=1,
                         warmup_steps=0)
    summary = finetune_on_ray(dataset, tmp_path / "ray", cfg, str(cache_dir), workers=2,
                              use_gpu=False)
    assert summary["world_size"] == 2 and summary["steps"] == 2 and summary["main_process"]
    assert (tmp_path / "ray" / "adapter" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "ray" / "checkpoints" / "checkpoint-2" / "rng_state_1.pth").is_file()
