"""The Ray cluster every distributed stage runs on: a local Ray started once per process, or
a running cluster joined by address.  Ray itself schedules; this module only starts or joins."""

from __future__ import annotations

import logging
import os
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass

#: retries of a batch whose Ray worker or actor process died (Ray Data's default is unlimited:
#: one input that crashes the process every time would stall the run forever).  Passed as
#: ``ray_remote_args`` (``max_retries``/``max_task_retries``), the only way in Ray 2.60 (it
#: warns that these move to named parameters in 2.64).  Shared by ingest and query pipelines.
BATCH_RETRIES = 3


@dataclass(frozen=True)
class RayConfig:
    """``address`` None = start a local Ray with ``num_cpus`` (None = all) under ``temp_dir``."""

    address: str | None = None
    num_cpus: int | None = None
    temp_dir: str = "/tmp/mmrag-ray"  # noqa: S108 - Ray's own default is /tmp/ray


log = logging.getLogger(__name__)
_early: tuple[threading.Thread, threading.Event] | None = None


def start_early(work: Callable[[], object]) -> None:
    """Run WORK (a start of Ray, and what should follow it at once) in a thread, so that the
    caller goes on meanwhile: ``ray.init`` spends seconds waiting for Ray's daemons (~3.5 s of
    a 2-core VM), which the command spends starting its flow instead.  Whatever needs Ray in
    this process waits for WORK first (``init_ray``, ``wait_early``).  A failure is logged and
    forgotten: the next ``init_ray`` starts Ray itself, and raises what stops it.

    The thread outlives WORK, parked until the process ends: Ray starts its daemons with
    ``PR_SET_PDEATHSIG``, which the kernel fires when the *thread* that started them ends."""
    global _early

    done = threading.Event()

    def run() -> None:
        try:
            work()
        except Exception as e:  # noqa: BLE001 - the flow starts Ray itself, and raises then
            log.warning("starting Ray ahead of the flow failed (%s: %s); the flow starts it",
                        type(e).__name__, e)
        finally:
            done.set()
        threading.Event().wait()

    wait_early()
    thread = threading.Thread(target=run, name="ray-early-start", daemon=True)
    _early = thread, done
    thread.start()


def wait_early() -> None:
    """Wait for a ``start_early`` still running (not from inside it)."""
    early = _early
    if early is not None and early[0] is not threading.current_thread():
        early[1].wait()


def init_ray(config: RayConfig) -> None:
    """Connect to a cluster (address) or start a local Ray once per process (after an early
    start still under way: ``start_early``)."""
    wait_early()
    import ray

    address, num_cpus, temp_dir = config.address, config.num_cpus, config.temp_dir

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    # Ray starts its daemons with fork+exec; lancedb warns about fork, but exec replaces the
    # child at once, so no lancedb state is used there.
    warnings.filterwarnings("ignore", message="lancedb fork support is experimental")
    if address:
        _connect(address)
        return
    os.makedirs(temp_dir, exist_ok=True)
    # a local Ray of our own: its token-auth notice is not the user's to act on
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(
        logging.ERROR)
    # started from a thread (``start_early``), Ray leaves SIGTERM to the program: the ``mmrag``
    # script turns it into a clean exit itself
    logging.getLogger("ray._private.worker").addFilter(_no_sigterm_notice)
    ray.init(num_cpus=num_cpus or os.cpu_count(), include_dashboard=False,
             log_to_driver=False, ignore_reinit_error=True, _temp_dir=os.path.abspath(temp_dir))


def _no_sigterm_notice(record: logging.LogRecord) -> bool:
    return "SIGTERM handler is not set" not in record.getMessage()


def _connect(address: str) -> None:
    """Join a running cluster.  Workers import this project's modules by name, so every node
    needs the same environment (this package installed, e.g. ``pip install -e .`` or one
    container image); nothing is shipped with the job.  Ray 2.60 heads started by
    ``ray start`` use token authentication when a token exists, and a driver given an explicit
    address only sends one with ``RAY_AUTH_MODE=token``: say so instead of a bare refusal."""
    import ray

    try:
        ray.init(address=address, log_to_driver=False, ignore_reinit_error=True)
    except ConnectionError as e:
        hint = ""
        if os.environ.get("RAY_AUTH_MODE", "").lower() != "token":
            hint = ("; if the cluster uses token authentication, set RAY_AUTH_MODE=token and "
                    "RAY_AUTH_TOKEN (or ~/.ray/auth_token) to the cluster's token")
        raise ConnectionError(f"cannot connect to the Ray cluster at {address}: {e}{hint}") from e


def quiet_ray_data() -> None:
    """Our own progress reporting replaces Ray Data's per-operator logs and bars."""
    import ray

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    ctx.execution_options.verbose_progress = False
    for name in ("ray.data", "ray.data._internal"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # it only announces that the bars are off, which we just asked for
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
    # the retry caps have no named parameter in Ray 2.60 yet; the notice is not the user's to act on
    warnings.filterwarnings("ignore", message=r".*`ray_remote_args` is deprecated")
