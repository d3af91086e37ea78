"""What a gRPC server per emulated component costs in a process that hosts many of them.

Why this exists: a host process of the emulator runs every component it holds with its
own sync gRPC server (``emulator/host.py``): its own completion queue, its poller thread
and its executor. At 192 nodes a host holds 96 of them, and the CPU per step and
component was 1.3-1.5x what it is at 32 nodes with 16 per host (issue 13; benchmarks/
README.md, "What grows from 32 to 192 nodes"). This script measures what the servers,
and the threads sync gRPC keeps per stream, add per message on the transport alone: a
spawned process holds ``--components`` echo endpoints, each on its own port of 127.0.0.1,
either

- ``server_each``: a sync server per endpoint, as the emulator's components have now, or
- ``shared_server``: one sync server that listens on every endpoint's port (the same
  number of ports, connections and streams; only the server machinery is shared), or
- ``aio_server``: one ``grpc.aio`` server on every endpoint's port, whose one event loop
  serves every stream (a sync server holds a thread per open stream), or
- ``aio_both``: that server, and a ``grpc.aio`` client whose one event loop drives every
  stream, or
- ``aio_via_thread``: as ``aio_both``, but the server hands every message to a worker
  thread and back before it echoes it (the loop's hand-off to compute off the loop), or
- ``loop_client``: a sync server per endpoint, and the emulator's client streams since
  2026-12-03 (``proto.loop_streams.ClientStream``: threads put and take the messages,
  one event loop drives every call),

and a client here (sync, but ``grpc.aio`` in the last two) keeps one open echo stream per
endpoint and sends rounds of one message (``--bytes``, 1 KiB) to each, waiting for all the
echoes. ``one_endpoint`` is the same with a single endpoint, for the per-message cost
without crowding. It prints, per message, the wall time
and the CPU of the server process and of the client; the modes alternate ``--repeats``
times, as the machine is noisy, and the summary gives the medians and each shared server's
CPU per message over a server each's.

    python benchmarks/bench_servers_per_process.py [--components 96] [--messages 3840]
        [--bytes 1024] [--repeats 3] [--json PATH]

A measurement script, not a test: it asserts nothing about time.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from functools import partial
from pathlib import Path
from statistics import median

import grpc

from benchmarks.bench_grpc_modes import (
    ECHO_METHOD,
    ECHO_PATH,
    ECHO_SERVICE,
    aio_echo_handlers,
    process_cpu_s,
    sync_echo_handlers,
)
from core.atomic import write_json_atomic
from proto.loop_streams import ClientStream

_WARMUP_ROUNDS = 20
#: Executor threads per server, as many as the streams it serves at once here (a sync
#: server runs each open stream's handler on a thread of its executor).
_THREADS_PER_ENDPOINT = 4


def _serve_sync(ports: multiprocessing.Queue, endpoints: int, *, shared: bool) -> None:
    """``endpoints`` sync echo endpoints on OS-chosen ports of 127.0.0.1 (their list put on
    ``ports``): one server each, or one ``shared`` server on all the ports."""
    servers, bound = [], []
    for _ in range(1 if shared else endpoints):
        server = grpc.server(
            futures.ThreadPoolExecutor(
                max_workers=_THREADS_PER_ENDPOINT * (endpoints if shared else 1)
            )
        )
        server.add_generic_rpc_handlers(sync_echo_handlers())
        for _ in range(endpoints if shared else 1):
            bound.append(server.add_insecure_port("127.0.0.1:0"))
        server.start()
        servers.append(server)
    ports.put(bound)
    threading.Event().wait()  # serves until the process is killed


def _serve_aio(
    ports: multiprocessing.Queue,
    endpoints: int,
    handlers: Callable[[], list[grpc.GenericRpcHandler]] = aio_echo_handlers,
) -> None:
    """``endpoints`` echo endpoints on one ``grpc.aio`` server: one event loop serves every
    port and stream (no thread per stream)."""

    async def serve() -> None:
        server = grpc.aio.server()
        server.add_generic_rpc_handlers(handlers())
        ports.put([server.add_insecure_port("127.0.0.1:0") for _ in range(endpoints)])
        await server.start()
        await server.wait_for_termination()

    asyncio.run(serve())


#: The worker thread of ``aio_via_thread``'s server (one, as a node computes one layer at a time).
_WORKER = futures.ThreadPoolExecutor(max_workers=1)


async def _echo_via_thread(requests, context):
    loop = asyncio.get_running_loop()
    async for message in requests:
        yield await loop.run_in_executor(_WORKER, bytes, message)


def _echo_via_thread_handlers() -> list[grpc.GenericRpcHandler]:
    """An aio echo that sends every message through a worker thread and back before its
    echo, as a layer would go from the loop to its compute off the loop: the price of one
    hand-off each way per message."""
    handler = grpc.stream_stream_rpc_method_handler(_echo_via_thread)
    return [grpc.method_handlers_generic_handler(ECHO_SERVICE, {ECHO_METHOD: handler})]


class _Stream:
    """One open echo stream to an endpoint, fed from a queue."""

    def __init__(self, port: int):
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        self._outbox: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self.answers = self.channel.stream_stream(ECHO_PATH)(self._requests(), timeout=600)

    def _requests(self) -> Iterator[bytes]:
        while (message := self._outbox.get()) is not None:
            yield message

    def send(self, payload: bytes) -> None:
        self._outbox.put(payload)

    def close(self) -> None:
        self._outbox.put(None)
        for _ in self.answers:  # the server ends the stream once the requests have
            pass
        self.channel.close()


def _rounds(streams: list[_Stream], count: int, payload: bytes) -> None:
    """``count`` rounds: a message to every endpoint, then every echo."""
    for _ in range(count):
        for stream in streams:
            stream.send(payload)
        for stream in streams:
            next(stream.answers)


def _sync_client(ports: list[int], rounds: int, payload: bytes, server_pid: int) -> tuple:
    """Sync streams, one per port: (streams, wall s, client CPU s, server CPU s)."""
    streams = [_Stream(port) for port in ports]
    _rounds(streams, _WARMUP_ROUNDS, payload)
    started = time.perf_counter()
    client_cpu, server_cpu = process_cpu_s(), process_cpu_s(server_pid)
    _rounds(streams, rounds, payload)
    wall_s = time.perf_counter() - started
    client_s, server_s = process_cpu_s() - client_cpu, process_cpu_s(server_pid) - server_cpu
    for stream in streams:
        stream.close()
    return len(streams), wall_s, client_s, server_s


def _aio_client(ports: list[int], rounds: int, payload: bytes, server_pid: int) -> tuple:
    """``grpc.aio`` streams, one per port, on one event loop: as ``_sync_client``."""

    async def run() -> tuple:
        channels = [grpc.aio.insecure_channel(f"127.0.0.1:{port}") for port in ports]
        calls = [channel.stream_stream(ECHO_PATH)(timeout=600) for channel in channels]

        async def round_trip(call) -> None:
            await call.write(payload)
            await call.read()

        async def some(count: int) -> None:
            for _ in range(count):  # a round: every endpoint's message in flight at once
                await asyncio.gather(*(round_trip(call) for call in calls))

        await some(_WARMUP_ROUNDS)
        started = time.perf_counter()
        client_cpu, server_cpu = process_cpu_s(), process_cpu_s(server_pid)
        await some(rounds)
        wall_s = time.perf_counter() - started
        client_s, server_s = process_cpu_s() - client_cpu, process_cpu_s(server_pid) - server_cpu
        for call in calls:
            await call.done_writing()
        for channel in channels:
            await channel.close()
        return len(calls), wall_s, client_s, server_s

    return asyncio.run(run())


class _LoopTwin:
    """The echo method for ``proto.loop_streams.ClientStream``: its ``on_loop()`` twin on a
    plain ``grpc.aio`` channel (the emulator's come from ``proto.rpc.channel``)."""

    def __init__(self, port: int):
        self._port = port
        self._method = None

    def on_loop(self):
        if self._method is None:  # made on the loop, as ClientStream calls it there
            channel = grpc.aio.insecure_channel(f"127.0.0.1:{self._port}")
            self._method = channel.stream_stream(ECHO_PATH)
        return self._method


def _loop_client(ports: list[int], rounds: int, payload: bytes, server_pid: int) -> tuple:
    """The emulator's client streams (``proto.loop_streams``): threads put the messages and
    take the answers, one event loop per process drives every call; as ``_sync_client``."""
    answers = [queue.SimpleQueue() for _ in ports]
    streams = [
        ClientStream(_LoopTwin(port), 600, box.put, lambda error: None)
        for port, box in zip(ports, answers, strict=True)
    ]

    def some(count: int) -> None:
        for _ in range(count):
            for stream in streams:
                stream.put(payload)
            for box in answers:
                box.get()

    some(_WARMUP_ROUNDS)
    started = time.perf_counter()
    client_cpu, server_cpu = process_cpu_s(), process_cpu_s(server_pid)
    some(rounds)
    wall_s = time.perf_counter() - started
    client_s, server_s = process_cpu_s() - client_cpu, process_cpu_s(server_pid) - server_cpu
    for stream in streams:
        stream.close()
    return len(streams), wall_s, client_s, server_s


#: Each mode: its endpoints (one, or ``--components``), how its process serves them and
#: how the client here talks to them.
_LAYOUTS: dict[str, tuple[bool, Callable, Callable]] = {
    "one_endpoint": (False, partial(_serve_sync, shared=False), _sync_client),
    "server_each": (True, partial(_serve_sync, shared=False), _sync_client),
    "shared_server": (True, partial(_serve_sync, shared=True), _sync_client),
    "aio_server": (True, _serve_aio, _sync_client),
    "aio_both": (True, _serve_aio, _aio_client),
    "aio_via_thread": (True, partial(_serve_aio, handlers=_echo_via_thread_handlers), _aio_client),
    "loop_client": (True, partial(_serve_sync, shared=False), _loop_client),
}
MODES = tuple(_LAYOUTS)


def measure(mode: str, components: int, messages: int, size: int = 1024) -> dict:
    """About ``messages`` echoed messages of ``size`` bytes, spread over the endpoints of
    ``mode``: wall time and CPU (server process, client) per message, microseconds."""
    crowded, serve, client = _LAYOUTS[mode]
    endpoints = components if crowded else 1
    rounds = max(1, messages // endpoints)
    spawn = multiprocessing.get_context("spawn")  # no fork of a process that runs gRPC
    ports = spawn.Queue()
    process = spawn.Process(target=serve, args=(ports, endpoints), daemon=True)
    process.start()
    try:
        bound = ports.get(timeout=120)
        num_streams, wall_s, client_s, server_s = client(bound, rounds, b"x" * size, process.pid)
    finally:
        process.kill()
        process.join()
    sent = rounds * num_streams
    return {
        "mode": mode,
        "endpoints": num_streams,  # the ports the server process listened on
        "messages": sent,
        "message_bytes": size,
        "wall_us_per_message": wall_s / sent * 1e6,
        "server_cpu_us_per_message": server_s / sent * 1e6,
        "client_cpu_us_per_message": client_s / sent * 1e6,
    }


def summary(rows: list[dict]) -> str:
    """Medians per mode of the server CPU per message, each shared server's over a server
    each's (below 1: what one server per host process would save), and the client's CPU
    per message with sync streams (``server_each``) and on an event loop (``aio_both``)."""

    def median_of(key: str, mode: str) -> float:
        return median(r[key] for r in rows if r["mode"] == mode)

    cpu = {mode: median_of("server_cpu_us_per_message", mode) for mode in MODES}

    def over_server_each(mode: str) -> str:
        return f"{cpu[mode] / cpu['server_each']:.2f}" if cpu["server_each"] > 0 else "-"

    client = {
        mode: median_of("client_cpu_us_per_message", mode)
        for mode in ("server_each", "aio_both", "loop_client")
    }
    return (
        "server CPU per message (median): "
        + ", ".join(f"{mode} {cpu[mode]:.0f} us" for mode in MODES)
        + "; over server_each: "
        + ", ".join(
            f"{mode} {over_server_each(mode)}"
            for mode in ("shared_server", "aio_server", "aio_both", "aio_via_thread")
        )
        + f"; client CPU per message: sync {client['server_each']:.0f} us, "
        f"aio {client['aio_both']:.0f} us, threads on the loop {client['loop_client']:.0f} us"
    )


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--components", type=int, default=96, help="endpoints in the process")
    parser.add_argument("--messages", type=int, default=3840, help="per run, about")
    parser.add_argument("--bytes", type=int, default=1024, help="bytes per message")
    parser.add_argument("--repeats", type=int, default=3, help="runs of every mode, alternating")
    parser.add_argument("--json", type=Path, help="write the rows here")
    args = parser.parse_args(argv)
    for name in ("components", "messages", "bytes", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    print(
        f"{args.components} endpoints in one process, about {args.messages} echoed messages of "
        f"{args.bytes} bytes a run, {args.repeats} run(s) per mode; per message:"
    )
    print(
        f"{'mode':<14} {'endpoints':>9} {'wall us':>8} {'server CPU us':>14} {'client CPU us':>14}"
    )
    rows = []
    for _ in range(args.repeats):
        for mode in MODES:
            row = measure(mode, args.components, args.messages, args.bytes)
            rows.append(row)
            print(
                f"{mode:<14} {row['endpoints']:>9} {row['wall_us_per_message']:>8.0f} "
                f"{row['server_cpu_us_per_message']:>14.0f} "
                f"{row['client_cpu_us_per_message']:>14.0f}",
                flush=True,
            )
    print(summary(rows))
    if args.json:
        write_json_atomic(args.json, {"components": args.components, "rows": rows})
    return rows


if __name__ == "__main__":
    main()
