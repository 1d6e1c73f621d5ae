"""The ``mmrag`` script exits right after its cleanup: exit handlers run, output arrives, the
status is the command's."""

from __future__ import annotations

import subprocess
import sys

import pytest

from mmrag.cli.exit import _status


def _run(tmp_path, *args: str) -> tuple[subprocess.CompletedProcess, str]:
    marker = tmp_path / "atexit.txt"
    code = (f"import atexit, sys; atexit.register(lambda: open({str(marker)!r}, 'w')"
            f".write('ran')); sys.argv = ['mmrag', *{list(args)!r}]; "
            "from mmrag.cli import main; main()")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, check=False)
    return run, marker.read_text() if marker.exists() else ""


def test_a_failed_command_keeps_its_status_message_and_cleanup(tmp_path):
    run, marker = _run(tmp_path, "ingest", str(tmp_path / "missing"))
    assert run.returncode == 2
    assert "does not exist" in run.stderr
    assert marker == "ran"


def test_all_output_arrives_through_a_pipe(tmp_path):
    run, marker = _run(tmp_path, "--help")
    assert run.returncode == 0 and marker == "ran"
    assert "ingest" in run.stdout and "query" in run.stdout
    assert run.stdout.rstrip().endswith("─╯"), run.stdout[-200:]


@pytest.mark.parametrize(("code", "status"), [(None, 0), (0, 0), (3, 3), ("bad input", 1)])
def test_exit_codes(code, status, capsys):
    assert _status(code) == status
    assert ("bad input" in capsys.readouterr().err) == (code == "bad input")


def test_sigterm_is_an_exit_with_the_cleanup(tmp_path):
    """A scheduler stopping the command: status 143, and the exit handlers (Ray's shutdown,
    the Prefect server's stop) still run."""
    marker = tmp_path / "atexit.txt"
    code = ("import atexit, os, signal, time; import mmrag.cli as cli; "
            f"atexit.register(lambda: open({str(marker)!r}, 'w').write('ran')); "
            "cli.app = lambda: (os.kill(os.getpid(), signal.SIGTERM), time.sleep(60)); "
            "from mmrag.cli.exit import main; main()")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, check=False)
    assert run.returncode == 143, run.stderr[-500:]
    assert marker.read_text() == "ran"
