"""Start the local Ray instance of a ``wafer train`` command while the driver imports torch.

Ray's start (its services and the first workers, seconds, mostly spent waiting for its
processes) and the driver's own imports (torch and the emulator, seconds of CPU) are
independent; run one after the other, they are most of a small run's time to its first
step. So the console script starts a local Ray before it imports anything heavy, while a
thread imports those (``start``), when the command line shows that the run will use a
local Ray: ``wafer train`` without ``--address``, and a ``--config`` file, if any, that
sets no ``runtime.address``. ``emulator.runtime.ensure_ray`` then finds Ray running.

Standard library only at import (``ray`` and ``yaml`` are imported inside ``start``).
``WAFER_EARLY_RAY=0`` turns it off (the bad-input tests of the CLI, which would
otherwise start Ray only to exit).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import threading
from collections.abc import Iterator

_started = False
_error: Exception | None = None


def start_local_ray(*, logging_level: int, num_cpus: int | None = None) -> None:
    """A fresh local Ray instance whose processes all listen on 127.0.0.1 only.

    With ``_node_ip_address`` on loopback, and kept there (``ray_keeps_loopback``), Ray
    2.60 binds its GCS, raylet, agents and every worker to 127.0.0.1 (measured with
    ``ss -ltnp``; tests/emulator/test_runtime_integration.py checks it). Ray's token
    authentication (on by default for a new local instance) stays on.
    """
    import ray

    with ray_keeps_loopback(), _without_idle_helpers(), _workers_share_one_heap():
        ray.init(
            address="local",  # a fresh instance, never someone else's cluster
            _node_ip_address="127.0.0.1",
            num_cpus=num_cpus,
            include_dashboard=False,
            log_to_driver=False,
            logging_level=logging_level,
        )


@contextlib.contextmanager
def ray_keeps_loopback() -> Iterator[None]:
    """While Ray starts or joins on 127.0.0.1, keep it there.

    Ray rewrites a loopback address (a cluster's, or ``_node_ip_address``) to the
    machine's routable one before it starts or connects, unless it believes it runs on a
    single machine (``ray_constants.ENABLE_RAY_CLUSTER``, read at each rewrite). Joining a
    loopback-only cluster (``ray start --node-ip-address 127.0.0.1``) it would then seek
    the GCS where nothing serves and hang, and a local instance would advertise the
    routable address. Afterwards the driver's node answers Ray's address questions.
    """
    from ray._private import ray_constants

    enabled = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = enabled


#: The environment of the local Ray's processes, where the user's own has none of it: the
#: C library's malloc keeps one heap for all of a process's threads (``_workers_share_one_heap``).
ONE_HEAP_ENV = {"MALLOC_ARENA_MAX": "1"}


@contextlib.contextmanager
def _workers_share_one_heap() -> Iterator[None]:
    """While a local Ray starts, its processes (and so every worker its raylet starts) get
    ``MALLOC_ARENA_MAX=1``; the driver's own environment is as it was afterwards.

    glibc gives each thread that allocates its own arena of 64 MiB heaps and unmaps a heap
    as soon as all of it is free, whatever ``M_TRIM_THRESHOLD`` says (``core.allocator``
    keeps only the main heap). A compute node allocates a step's activations and each
    layer's weights on its compute threads, frees them by the end of the step and faults
    the same pages in again the next: a 1-node gpt-10m node took about 11,000 minor page
    faults a second, and its compute 1.04-1.12x torch's step (1.03-1.05x with one arena;
    benchmarks/README.md, "One malloc arena per process"). With one arena all threads
    use the main heap, which keeps what it frees. Read by glibc when a process
    starts, so it has to be in the environment Ray's processes inherit; a user's own
    ``MALLOC_ARENA_MAX`` is kept.
    """
    added = {k: v for k, v in ONE_HEAP_ENV.items() if k not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


@contextlib.contextmanager
def _without_idle_helpers() -> Iterator[None]:
    """While a local Ray starts, leave out three of its helper processes that a run never
    uses: the autoscaler's monitor (a local instance has a fixed size), the log monitor
    (which only forwards the workers' output to a driver, and ours start with
    ``log_to_driver=False``) and the dashboard's API server (``_no_api_server``). Each is a
    Python process importing Ray, about 0.8 s of CPU at every start, on a machine where the
    run's own processes are starting at the same time. ``ray.init`` has no argument for
    the monitors; its ``RayParams`` does (``no_monitor``, ``include_log_monitor``), so they
    are set as its defaults here. The API server starts even with
    ``include_dashboard=False`` (then without the dashboard's pages), so ``Node``'s method
    that starts it is replaced while Ray starts.
    """
    from ray._private import node, parameter

    original = parameter.RayParams.__init__
    original_api_server = node.Node.start_api_server

    def init(self, *args, **kwargs) -> None:
        kwargs.setdefault("no_monitor", True)
        kwargs.setdefault("include_log_monitor", False)
        original(self, *args, **kwargs)

    parameter.RayParams.__init__ = init
    node.Node.start_api_server = _no_api_server
    try:
        yield
    finally:
        parameter.RayParams.__init__ = original
        node.Node.start_api_server = original_api_server


def _no_api_server(self, *, include_dashboard: bool | None, raise_on_failure: bool) -> None:
    """Ray's API server (the dashboard process, minimal without ``include_dashboard``: job
    submission and the state API) is left out, as where Ray's dashboard cannot start: the
    node then has no web UI address (``webui_url`` None)."""
    if include_dashboard:
        raise ValueError("a local Ray of a run starts without its dashboard")


def local_run(argv: list[str]) -> tuple[bool, bool]:
    """Whether the command line is a ``wafer train`` on a local Ray, and ``--verbose``'s value
    (from the flag or the config file). Anything unclear (a config file that does not read
    as YAML) answers no: the run then starts Ray as usual, later."""
    if os.environ.get("WAFER_EARLY_RAY") == "0" or not argv or argv[0] != "train":
        return False, False
    parser = argparse.ArgumentParser(add_help=False)
    for flag in ("--address", "--config"):
        parser.add_argument(flag)
    parser.add_argument("--verbose", action="store_true")
    parser.add_argument("-h", "--help", action="store_true")
    try:
        known, _ = parser.parse_known_args(argv[1:])
    except SystemExit:  # a malformed command line: argparse reports it later
        return False, False
    if known.help or known.address is not None:
        return False, False
    verbose = known.verbose
    if known.config is not None:
        import yaml

        try:
            with open(known.config) as f:
                data = yaml.safe_load(f)
        except (OSError, yaml.YAMLError):
            return False, False
        runtime = data.get("runtime", {}) if isinstance(data, dict) else None
        if not isinstance(runtime, dict) or runtime.get("address") is not None:
            return False, False
        verbose = verbose or runtime.get("verbose") is True
    return True, verbose


def start(argv: list[str]) -> None:
    """Start a local Ray now if the command line ``argv`` will use one, while a thread
    imports what the run needs next (torch and the emulator).

    Ray starts in the main thread, as it expects (a driver started from another thread
    stops working once that thread ends); Python imports from any thread.
    """
    global _started, _error
    local, verbose = local_run(argv)
    if not local or _started:
        return
    _started = True

    def preload() -> None:
        with contextlib.suppress(BaseException):  # the main thread imports them again
            import emulator.train  # noqa: F401

    importer = threading.Thread(target=preload, name="preload-imports", daemon=True)
    importer.start()
    # As ensure_ray would (Ray's start-up warnings reach the output only when verbose).
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    try:
        start_local_ray(logging_level=logging.WARNING if verbose else logging.ERROR)
    except Exception as exc:  # ensure_ray raises it, where a later start would have
        _error = exc
    # The caller imports the same modules next. Two threads importing one cycle of modules
    # (emulator.cost and its stats) can each meet the other's half-done module: Python
    # then raises ImportError ("partially initialized module"). Ray is up; wait for them.
    importer.join()


def started() -> bool:
    """True if ``start`` started a local Ray (``ensure_ray`` must not keep it for a run that
    joins a cluster after all)."""
    return _started


def failure() -> Exception | None:
    """The error of an early start that failed (not tried again: Ray may have left
    processes behind, and a second start on the same overloaded machine fares no better)."""
    return _error


__all__ = ["failure", "local_run", "ray_keeps_loopback", "start", "start_local_ray", "started"]
