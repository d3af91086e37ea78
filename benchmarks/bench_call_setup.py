"""What a stream call per pass costs against one stream kept open: sync gRPC, loopback.

Why this exists: every link of the emulator opens its pass streams anew for every pass
(``DeliverPass``, ``ReducePass``, ``RunPass``, ``StreamPass``, ``PushPass``), so every
pass pays each link's call set-up: gRPC's thread that consumes the request iterator, the
channel's poller thread when the channel was idle, a server thread for the handler and
the HTTP/2 stream. This script measures that set-up against the messages of a pass, to
size the lever of streams kept open across passes (issues 13 and 14): an echo server
(sync gRPC, as the emulator's) in its own spawned process, a sync client here sending
``--passes`` passes of ``--layers`` messages each, every message waiting for its echo,
(a) each pass on a new call, as the emulator does, and (b) every pass on one open call.
It prints, per pass, the wall time and the CPU time of the client and the server
processes, and the ratio of (a) to (b); on 127.0.0.1 only.

    python benchmarks/bench_call_setup.py [--layers 6] [--passes 300] [--bytes 1024] [--json PATH]

A measurement script, not a test: it asserts nothing about time.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import queue
import time
from collections.abc import Iterator
from pathlib import Path

import grpc

from benchmarks.bench_grpc_modes import ECHO_PATH, process_cpu_s, sync_echo_server
from core.atomic import write_json_atomic

_WARMUP_PASSES = 20
MODES = ("call_per_pass", "open_call")


class _Call:
    """One stream call fed from a queue, as the emulator's pass links are."""

    def __init__(self, channel: grpc.Channel):
        self._outbox: queue.Queue[bytes | None] = queue.Queue()
        self.answers = channel.stream_stream(ECHO_PATH)(self._requests(), timeout=600)

    def _requests(self) -> Iterator[bytes]:
        while (message := self._outbox.get()) is not None:
            yield message

    def round_trip(self, payload: bytes) -> None:
        self._outbox.put(payload)
        next(self.answers)

    def close(self) -> None:
        self._outbox.put(None)
        for _ in self.answers:  # the call's end
            pass


def _passes(channel: grpc.Channel, mode: str, count: int, layers: int, payload: bytes) -> None:
    call = _Call(channel) if mode == "open_call" else None
    for _ in range(count):
        this_pass = call or _Call(channel)
        for _ in range(layers):
            this_pass.round_trip(payload)
        if call is None:
            this_pass.close()
    if call is not None:
        call.close()


def measure(mode: str, layers: int, passes: int, size: int) -> dict:
    """``passes`` passes of ``layers`` echoed messages of ``size`` bytes in ``mode``: wall and
    CPU (client, server) per pass."""
    spawn = multiprocessing.get_context("spawn")  # no fork of a process that runs gRPC
    ports = spawn.Queue()
    process = spawn.Process(target=sync_echo_server, args=(ports,), daemon=True)
    process.start()
    try:
        port = ports.get(timeout=60)
        payload = b"x" * size
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            _passes(channel, mode, _WARMUP_PASSES, layers, payload)
            started = time.perf_counter()
            client_cpu, server_cpu = process_cpu_s(), process_cpu_s(process.pid)
            _passes(channel, mode, passes, layers, payload)
            wall_s = time.perf_counter() - started
            client_s, server_s = (
                process_cpu_s() - client_cpu,
                process_cpu_s(process.pid) - server_cpu,
            )
    finally:
        process.kill()
        process.join()
    return {
        "mode": mode,
        "layers_per_pass": layers,
        "message_bytes": size,
        "wall_us_per_pass": wall_s / passes * 1e6,
        "client_cpu_us_per_pass": client_s / passes * 1e6,
        "server_cpu_us_per_pass": server_s / passes * 1e6,
    }


def _ratio(numerator: float, denominator: float) -> str:
    # A short run can read no CPU tick at all (10 ms clock ticks).
    return f"{numerator / denominator:.2f}" if denominator > 0 else "-"


def _summary(rows: list[dict], layers: int) -> str:
    """The call-per-pass figures over the open call's, and the set-up in messages."""
    new, kept = rows
    cpu = {r["mode"]: r["client_cpu_us_per_pass"] + r["server_cpu_us_per_pass"] for r in rows}
    setup_us = cpu["call_per_pass"] - cpu["open_call"]
    return (
        "a call per pass / one open call: wall "
        f"{_ratio(new['wall_us_per_pass'], kept['wall_us_per_pass'])}, CPU "
        f"{_ratio(cpu['call_per_pass'], cpu['open_call'])}; set-up per call: {setup_us:.0f} us "
        f"of CPU, the CPU of {_ratio(setup_us, cpu['open_call'] / layers)} messages"
    )


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=6, help="messages per pass")
    parser.add_argument("--passes", type=int, default=300)
    parser.add_argument("--bytes", type=int, default=1024, help="bytes per message")
    parser.add_argument("--json", type=Path, help="write the rows here")
    args = parser.parse_args(argv)
    for name in ("layers", "passes", "bytes"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    print(f"{args.passes} passes of {args.layers} echoed messages of {args.bytes} bytes; per pass:")
    print(f"{'mode':<14} {'wall us':>9} {'client CPU us':>14} {'server CPU us':>14}")
    rows = []
    for mode in MODES:
        row = measure(mode, args.layers, args.passes, args.bytes)
        rows.append(row)
        print(
            f"{mode:<14} {row['wall_us_per_pass']:>9.0f} {row['client_cpu_us_per_pass']:>14.0f} "
            f"{row['server_cpu_us_per_pass']:>14.0f}",
            flush=True,
        )
    print(_summary(rows, args.layers))
    if args.json:
        write_json_atomic(args.json, {"passes": args.passes, "rows": rows})
    return rows


if __name__ == "__main__":
    main()
