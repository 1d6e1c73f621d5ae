"""The ``gpu`` extra resolves: pip's own resolver, against the package index, finds one
environment holding this project, vLLM and the torch/torchvision/transformers vLLM pins.

Nothing is installed (``--dry-run``); the resolution is read from ``--report``.  The test needs
the package index: where it cannot be reached the test fails and says so, because a skipped
check is exactly how an unresolvable extra went unnoticed before.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
_OFFLINE = re.compile(r"NewConnectionError|Network is unreachable|Temporary failure in name "
                      r"resolution|Name or service not known|ConnectTimeout|ProxyError|"
                      r"Could not fetch URL|No matching distribution found for vllm")


def _version(report: dict, name: str) -> str:
    found = [i["metadata"]["version"] for i in report["install"]
             if i["metadata"]["name"].lower().replace("_", "-") == name]
    assert found, f"{name} is not in the resolved environment"
    return found[0]


def test_gpu_extra_resolves(tmp_path):
    report_path = tmp_path / "report.json"
    env = os.environ | {"PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    run = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
         "--report", str(report_path), f"{ROOT}[gpu]"],
        capture_output=True, text=True, timeout=1500, env=env, cwd=tmp_path)
    lines = (run.stderr or run.stdout).splitlines()
    tail = "\n".join(x for x in lines if not x.startswith("WARNING: Location"))[-2500:]
    if run.returncode != 0 and _OFFLINE.search(tail):
        pytest.fail("the package index could not be reached, so '.[gpu]' could not be "
                    f"resolved (this test needs the index):\n{tail}", pytrace=False)
    assert run.returncode == 0, f"pip cannot resolve '.[gpu]':\n{tail}"
    report = json.loads(report_path.read_text())
    vllm = _version(report, "vllm")
    assert vllm.startswith("0.33."), vllm
    assert _version(report, "torch").split("+")[0] == "2.14.0"
    assert _version(report, "torchvision").split("+")[0] == "0.29.0"
    major, minor = map(int, _version(report, "transformers").split(".")[:2])
    assert (5, 16) <= (major, minor) < (5, 21)
    assert _version(report, "mmrag") == "0.1.0"
    # vLLM caps fastapi below 0.137; prefect 3.7.8+ needs 0.139+: the extra gets prefect 3.7.7
    assert _version(report, "prefect") == "3.7.7"
    assert tuple(map(int, _version(report, "fastapi").split(".")[:2])) < (0, 137)


def test_a_cpu_install_keeps_the_tested_prefect(tmp_path):
    """The prefect range admits 3.7.7 for the gpu extra; without it pip still picks 3.8.8."""
    report_path = tmp_path / "report.json"
    run = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
         "--report", str(report_path), str(ROOT)],
        capture_output=True, text=True, timeout=1500, cwd=tmp_path)
    assert run.returncode == 0, f"pip cannot resolve '.':\n{(run.stderr or run.stdout)[-2500:]}"
    report = json.loads(report_path.read_text())
    assert _version(report, "prefect") == "3.8.8"
    assert _version(report, "torch").split("+")[0] != "2.14.0"  # the CPU pair, not vLLM's
