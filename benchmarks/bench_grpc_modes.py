"""Round trip of one message on a bidirectional gRPC stream: sync gRPC against grpc.aio.

Why this exists: the emulator's services use sync gRPC (a thread pool per server, a
thread per streaming call), and per-message overhead is what keeps small models such as
mlp-digits far from torch's speed (issue 14). This script measures the lever an event
loop per process (``grpc.aio``) would give, on the transport alone: an echo server in
its own spawned process, a client in this one, every pairing of the two APIs, sending
a message and waiting for its echo, ``--messages`` times after a warm-up, on
127.0.0.1 only. It prints microseconds per round trip (wall) and the client process's
CPU microseconds per round trip.

    python benchmarks/bench_grpc_modes.py [--sizes 1024 262144] [--messages 2000] [--json PATH]

A measurement script, not a test: it asserts nothing about time.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import queue
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc

from core.atomic import write_json_atomic

#: The echo servers' service and method names.
ECHO_SERVICE, ECHO_METHOD = "bench.Echo", "Echo"
#: The echo servers' one method (a bidirectional stream that answers each message with it).
ECHO_PATH = f"/{ECHO_SERVICE}/{ECHO_METHOD}"
_WARMUP = 50
MODES = ("sync", "aio")


def process_cpu_s(pid: int | None = None) -> float:
    """CPU seconds of this process, or of process ``pid`` (Linux ``/proc``)."""
    if pid is None:
        times = os.times()
        return times.user + times.system
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _sync_echo(requests, context):
    yield from requests


def sync_echo_handlers() -> list[grpc.GenericRpcHandler]:
    """The sync echo method (``ECHO_PATH``), for ``grpc.Server.add_generic_rpc_handlers``."""
    handler = grpc.stream_stream_rpc_method_handler(_sync_echo)
    return [grpc.method_handlers_generic_handler(ECHO_SERVICE, {ECHO_METHOD: handler})]


def sync_echo_server(ports: multiprocessing.Queue) -> None:
    """A sync gRPC echo server on an OS-chosen port of 127.0.0.1 (put on ``ports``), serving
    until its process ends."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers(sync_echo_handlers())
    ports.put(server.add_insecure_port("127.0.0.1:0"))
    server.start()
    server.wait_for_termination()


async def _aio_echo(requests, context):
    async for message in requests:
        yield message


def aio_echo_handlers() -> list[grpc.GenericRpcHandler]:
    """The grpc.aio echo method (``ECHO_PATH``), for ``grpc.aio.Server.add_generic_rpc_handlers``."""
    handler = grpc.stream_stream_rpc_method_handler(_aio_echo)
    return [grpc.method_handlers_generic_handler(ECHO_SERVICE, {ECHO_METHOD: handler})]


def _aio_server(ports: multiprocessing.Queue) -> None:
    async def serve() -> None:
        server = grpc.aio.server()
        server.add_generic_rpc_handlers(aio_echo_handlers())
        ports.put(server.add_insecure_port("127.0.0.1:0"))
        await server.start()
        await server.wait_for_termination()

    asyncio.run(serve())


def _sync_client(port: int, size: int, messages: int) -> tuple[float, float]:
    outbox: queue.Queue[bytes | None] = queue.Queue()

    def requests() -> Iterator[bytes]:
        while (message := outbox.get()) is not None:
            yield message

    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        answers = channel.stream_stream(ECHO_PATH)(requests(), timeout=600)
        payload = b"x" * size
        for count in (_WARMUP, messages):
            started, cpu = time.perf_counter(), process_cpu_s()
            for _ in range(count):
                outbox.put(payload)
                next(answers)
            wall_s, cpu_s = time.perf_counter() - started, process_cpu_s() - cpu
        outbox.put(None)
    return wall_s, cpu_s


def _aio_client(port: int, size: int, messages: int) -> tuple[float, float]:
    async def run() -> tuple[float, float]:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = channel.stream_stream(ECHO_PATH)(timeout=600)
            payload = b"x" * size
            for count in (_WARMUP, messages):
                started, cpu = time.perf_counter(), process_cpu_s()
                for _ in range(count):
                    await call.write(payload)
                    await call.read()
                wall_s, cpu_s = time.perf_counter() - started, process_cpu_s() - cpu
            await call.done_writing()
            return wall_s, cpu_s

    return asyncio.run(run())


_SERVERS = {"sync": sync_echo_server, "aio": _aio_server}
_CLIENTS = {"sync": _sync_client, "aio": _aio_client}


def measure(server: str, client: str, size: int, messages: int) -> dict:
    """One pairing: the echo server of API ``server`` in a spawned process, a client of API
    ``client`` here; microseconds per round trip and the client's CPU per round trip."""
    spawn = multiprocessing.get_context("spawn")  # no fork of a process that runs gRPC
    ports = spawn.Queue()
    process = spawn.Process(target=_SERVERS[server], args=(ports,), daemon=True)
    process.start()
    try:
        port = ports.get(timeout=60)
        wall_s, cpu_s = _CLIENTS[client](port, size, messages)
    finally:
        process.kill()
        process.join()
    return {
        "server": server,
        "client": client,
        "message_bytes": size,
        "round_trip_us": wall_s / messages * 1e6,
        "client_cpu_us": cpu_s / messages * 1e6,
    }


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 262144])
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--json", type=Path, help="write the rows here")
    args = parser.parse_args(argv)
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    rows = []
    print(f"{'server':<7} {'client':<7} {'bytes':>8} {'us/round trip':>14} {'client CPU us':>14}")
    for size in args.sizes:
        for server in MODES:
            for client in MODES:
                row = measure(server, client, size, args.messages)
                rows.append(row)
                print(
                    f"{server:<7} {client:<7} {size:>8} {row['round_trip_us']:>14.1f} "
                    f"{row['client_cpu_us']:>14.1f}",
                    flush=True,
                )
    if args.json:
        write_json_atomic(args.json, {"messages": args.messages, "rows": rows})
    return rows


if __name__ == "__main__":
    main()
