"""Step time with the run token, and with token plus TLS, over step time without either.

The cluster is the in-process one of ``benchmarks/fuzz_services.py``: MemoryX,
a SwarmX root and two compute nodes, each on its own loopback gRPC server,
trained step after step through the root (forward and backward of every
layer, then CommitStep). Three modes, interleaved round by round so that the
machine's load drifts alike for all of them:

- **plain**: servers and calls as before issue 12 (no guard interceptor, no token,
  no TLS): ``grpc.server`` and ``grpc.aio.server`` make unguarded servers and calls
  carry no token, in this process only and only while a plain cluster is built and run;
- **token**: the run token on every call, checked by the server interceptor
  (with its stream cap and idle watch), plaintext on loopback;
- **token+tls**: the same over TLS with a per-run CA (``runtime.tls.force``).

Each round builds a fresh cluster per mode, runs one warm-up step and then
``--steps`` timed steps; a mode's step time is the median over all its timed
steps. **ratio = mode / plain**; the target of issue 12 is <= 1.05 for
token+tls. ``--hidden`` sets the width of the 2-layer MLP (bytes streamed
per step grow with it; TLS cost grows with bytes, the token's with calls).

    python benchmarks/bench_auth.py                     # hidden 1024, 5 rounds x 20 steps
    python benchmarks/bench_auth.py --hidden 16 --rounds 3 --json out.json

This is a measurement script, not a test: it asserts nothing about time.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import grpc

import benchmarks.fuzz_services as fz
import proto.rpc
from core.atomic import write_json_atomic
from proto.rpc import Security
from proto.tls import generate_run_tls


@contextmanager
def _plain():
    """Servers without the guard (no token check, stream cap or idle watch) and calls
    without the token, everywhere in this process: as before issue 12. (A plain mode's
    ``Security`` has no TLS.) Every server of the project is made by ``grpc.server`` or
    ``grpc.aio.server`` with the guard as its interceptor, and every call's token comes
    from ``proto.rpc``'s per-call metadata: both are swapped here and put back after."""
    sync_server, aio_server = grpc.server, grpc.aio.server
    with_token = proto.rpc._WithToken._metadata

    def unguarded(make):
        def server(*args, interceptors=None, **kwargs):
            return make(*args, **kwargs)

        return server

    try:
        grpc.server, grpc.aio.server = unguarded(sync_server), unguarded(aio_server)
        proto.rpc._WithToken._metadata = lambda self, metadata: metadata or ()
        yield
    finally:
        grpc.server, grpc.aio.server = sync_server, aio_server
        proto.rpc._WithToken._metadata = with_token


def _time_steps(security: Security, hidden: int, steps: int, plain: bool) -> list[float]:
    context = _plain() if plain else _nothing()
    with context:
        cluster = fz.build_services(security, hidden=hidden, chunk_bytes=256 * 1024)
        try:
            _check_mode(cluster, plain)
            cluster.train_step(0)  # warm-up: channels, threads, TLS handshakes
            times = []
            for step in range(1, steps + 1):
                started = time.perf_counter()
                cluster.train_step(step)
                times.append(time.perf_counter() - started)
            return times
        finally:
            cluster.stop()


def _check_mode(cluster: fz.Services, plain: bool) -> None:
    """The mode is what it says: only a plain cluster answers a call without the token."""
    bare = grpc.insecure_channel(cluster.addresses["memoryx"])
    stats = bare.unary_unary("/wafer.v1.MemoryX/Stats")
    try:
        stats(b"", timeout=10)
        refused = None
    except grpc.RpcError as exc:
        refused = exc.code()
    finally:
        bare.close()
    expected = (
        None
        if plain
        else (
            grpc.StatusCode.UNAVAILABLE  # TLS: no plaintext handshake
            if cluster.security.tls
            else grpc.StatusCode.UNAUTHENTICATED
        )
    )
    if refused != expected:
        raise RuntimeError(f"benchmark mode broken: a call without token got {refused}")


@contextmanager
def _nothing():
    yield


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=1024, help="MLP width, units")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per round and mode")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    modes = {
        "plain": (Security.generate(), True),
        "token": (Security.generate(), False),
        "token+tls": (Security.generate(tls=generate_run_tls()), False),
    }
    samples: dict[str, list[float]] = {mode: [] for mode in modes}
    for round_index in range(args.rounds):
        order = list(modes) if round_index % 2 == 0 else list(reversed(modes))
        for mode in order:
            security, plain = modes[mode]
            samples[mode] += _time_steps(security, args.hidden, args.steps, plain)
    params = 64 * args.hidden + args.hidden + args.hidden * 10 + 10
    median = {mode: statistics.median(times) for mode, times in samples.items()}
    print(f"2-layer MLP, hidden {args.hidden} ({params:,} params), 2 nodes, in-process gRPC")
    print(f"{args.rounds} rounds x {args.steps} steps per mode, interleaved")
    print(f"{'mode':12s} {'ms/step':>9s} {'ratio':>7s} {'min ratio':>9s}")
    for mode, times in samples.items():
        print(
            f"{mode:12s} {1e3 * median[mode]:9.2f} {median[mode] / median['plain']:7.3f} "
            f"{min(times) / min(samples['plain']):9.3f}"
        )
    if args.json:
        write_json_atomic(
            args.json,
            {
                "hidden": args.hidden,
                "params": params,
                "median_step_s": median,
                "ratio": {m: median[m] / median["plain"] for m in median},
                "step_s": samples,
            },
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
