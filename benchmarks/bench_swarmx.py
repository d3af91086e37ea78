"""SwarmX broadcast throughput relative to a point-to-point gRPC stream, measured side by side.

Servers on 127.0.0.1, no Ray: a MemoryX servicer holding one big layer, a
SwarmX root whose children are counting sinks (a minimal ``LayerSink`` that
consumes each stream and acknowledges the bytes it got), and a raw-bytes
stream server. They run as threads of this process, or with ``--processes``
one process each (as the Ray actors do). The client is this process. These
transfers are timed, interleaved, in every round:

  p2p-memoryx  MemoryX ``StreamWeights`` read straight by one client: the
               same server-side encoding SwarmX pulls through, one hop, one
               receiver. This is the baseline of the headline ratio.
  p2p-raw      a minimal generic gRPC server-streaming call that sends the
               same number of bytes as pre-built ~1 MB ``bytes`` messages (no
               protobuf, no tensor copy): the ceiling of one gRPC stream here.
  swarmx-N     ``SwarmX.RunLayer(FORWARD)`` on a root with N sink children:
               MemoryX -> root -> N sinks, cut-through.

delivered bytes/s of swarmx-N = N x layer bytes / time of RunLayer.
Headline: aggregate delivered / p2p-memoryx, and per link (= aggregate / N) / p2p-memoryx,
from the median round of each transfer (and, printed too, from the fastest). Issue 14's
targets are printed too: MemoryX StreamWeights / p2p-raw, and swarmx-N aggregate / p2p-raw.
The client and the sinks read the streams as the project's receivers do (``proto.wire``:
chunk values viewed in the received bytes, no protobuf object per chunk).

    python benchmarks/bench_swarmx.py            # 64 MiB layer, 4 sinks, both transports, ~25 s
    python benchmarks/bench_swarmx.py --quick    # 16 MiB layer, 5 rounds
    python benchmarks/bench_swarmx.py --processes --json out.json   # ~40 s

Each run measures both ways a payload crosses between processes, one after the other:
``shared-memory`` (chunk payloads through the writers' shared-memory rings, what a run
uses between processes of one host, ``runtime.shared_memory: auto``) and ``grpc`` (the
payload bytes inside the gRPC messages, what crosses between hosts). The raw stream,
the baseline of issue 14's ratios, is gRPC bytes in both.

This is a measurement script, not a test: it asserts nothing about time.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import multiprocessing
import os
import platform
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

# gRPC's core logs every GOAWAY of the servers this script stops at INFO; as `wafer` does.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

import grpc
import torch

from core.atomic import write_json_atomic
from memoryx.optim import Optimizer
from memoryx.service import MemoryXServicer
from memoryx.service import register as register_memoryx
from proto import memoryx_pb2 as mpb
from proto import memoryx_pb2_grpc as mgrpc
from proto import shm
from proto import swarmx_pb2 as spb
from proto import swarmx_pb2_grpc as sgrpc
from proto import tensor_pb2 as pb
from proto.domain import Chunk, Header
from proto.frames import verify_shared
from proto.rpc import Security, channel, start_server
from proto.serde import DEFAULT_CHUNK_BYTES, encode_layer
from proto.shm import SharedMemoryPlan
from proto.wire import fast_channel
from proto.wire import register as register_fast
from swarmx.service import SwarmXServicer
from swarmx.service import serve as serve_swarmx

# This module's run credentials (token only: loopback).
SECURITY = Security.generate()
#: The ways a chunk's payload crosses between processes, in the order a run measures them.
TRANSPORTS = ("shared-memory", "grpc")
#: Issue 14's targets: MemoryX StreamWeights and the SwarmX aggregate to 4 nodes, each
#: at least this fraction of the raw gRPC stream's bytes/s.
TARGET_VS_RAW = 0.8

HOST = "127.0.0.1"
MB = 1_000_000  # rates are reported in MB/s (10^6 bytes)
_RAW_METHOD = "/bench.RawStream/Pull"


class CountingSink(sgrpc.LayerSinkServicer):
    """A compute node stand-in: consumes a layer stream and acknowledges its payload bytes."""

    def __init__(self) -> None:
        self.payload_bytes = 0
        self._lock = threading.Lock()

    def Deliver(self, request_iterator, context):
        # Items decoded as a compute node decodes them (proto.wire: data viewed in place).
        header = None
        received = 0
        for item in request_iterator:
            if isinstance(item, Header):
                header = item
            elif isinstance(item, Chunk):
                received += len(item.data)
                _read_out(item)
        with self._lock:
            self.payload_bytes += received
        return pb.LayerAck(
            layer=header.layer if header else 0,
            step=header.step if header else 0,
            phase=header.phase if header else pb.PHASE_UNSPECIFIED,
            num_nodes=1,
            bytes_to_nodes=received,
            update_applied=True,
        )


def _read_out(chunk: Chunk) -> None:
    """A chunk in shared memory is copied out and checked, as a node's assembler does (over
    gRPC the receiver's copy is the transport's, already made)."""
    if chunk.shared is not None:
        _scratch(len(chunk.data))[: len(chunk.data)] = chunk.data
        verify_shared(chunk)


_SCRATCH = threading.local()


def _scratch(size: int) -> bytearray:
    buffer = getattr(_SCRATCH, "buffer", None)
    if buffer is None or len(buffer) < size:
        buffer = _SCRATCH.buffer = bytearray(size)
    return buffer


def _layer_weight(num_params: int, seed: int) -> torch.Tensor:
    return torch.randn(num_params, generator=torch.Generator().manual_seed(seed))


def _raw_stream_handler(chunks: list[bytes]) -> grpc.GenericRpcHandler:
    """A server-streaming method that sends ``chunks`` as raw bytes (identity serializers)."""

    def pull(request: bytes, context) -> Iterator[bytes]:
        yield from chunks

    return grpc.method_handlers_generic_handler(
        "bench.RawStream",
        {"Pull": grpc.unary_stream_rpc_method_handler(pull)},
    )


def _build_server(kind: str, options: dict) -> tuple[grpc.Server, str]:
    """Start one component's gRPC server on HOST; returns it and its address."""
    # A spawned process imports this module afresh: the driver's credentials come along.
    security = options["security"]
    if kind == "memoryx":
        # One layer, loaded by the driver; SGD without momentum keeps no optimizer state.
        servicer = MemoryXServicer(
            Optimizer.Config(name="sgd", lr=1e-3, momentum=0.0).build(),
            chunk_bytes=options["chunk_bytes"],
        )
        return start_server(lambda s: register_memoryx(s, servicer), HOST, security=security)
    if kind == "raw":
        # The same bytes as the layer, pre-cut into chunk_bytes messages.
        raw = memoryview(_layer_weight(options["num_params"], options["seed"]).numpy()).cast("B")
        size = options["chunk_bytes"]
        chunks = [bytes(raw[o : o + size]) for o in range(0, len(raw), size)]
        return start_server(
            lambda s: s.add_generic_rpc_handlers((_raw_stream_handler(chunks),)),
            HOST,
            security=security,
        )
    if kind == "sink":
        sink = CountingSink()
        return start_server(
            lambda s: register_fast(sgrpc.add_LayerSinkServicer_to_server, sink, s),
            HOST,
            security=security,
        )
    if kind == "swarmx":
        root = SwarmXServicer(options["name"], security=security)
        server, address = serve_swarmx(root, HOST, security=security)
        root.connect(children=options["children"], parent=None, memoryx=options["memoryx"])
        return server, address
    raise ValueError(f"unknown component {kind!r}")


def _component_process(kind: str, options: dict, conn) -> None:
    """Body of a spawned component: serve until the driver says stop (or goes away)."""
    server, address = _build_server(kind, options)
    conn.send(address)
    with contextlib.suppress(EOFError):
        conn.recv()
    server.stop(grace=None)


class Setup:
    """The servers of one benchmark run: threads of this process, or one process each."""

    def __init__(
        self,
        *,
        num_params: int,
        children: list[int],
        chunk_bytes: int,
        seed: int,
        security: Security,
        processes: bool = False,
    ):
        self.layer_bytes = num_params * 4
        self.processes = processes
        self._servers: list[grpc.Server] = []
        self._children: list[tuple[multiprocessing.Process, object]] = []
        base = {
            "chunk_bytes": chunk_bytes,
            "num_params": num_params,
            "seed": seed,
            "security": security,
        }
        try:
            # Components that need no address of another start together, then the roots.
            first = [("memoryx", base), ("raw", base)]
            first += [("sink", base) for n in children for _ in range(n)]
            self.memoryx_address, raw_address, *sinks = self._start_all(first)
            roots = []
            for n in children:
                mine, sinks = sinks[:n], sinks[n:]
                options = {
                    "name": f"swarmx-root-fanout{n}",
                    "children": {f"node-{i}": a for i, a in enumerate(mine)},
                    "memoryx": self.memoryx_address,
                    "security": security,
                }
                roots.append(("swarmx", options))
            root_addresses = dict(zip(children, self._start_all(roots), strict=True))
            # Read as the project's clients read (proto.wire), not through protobuf objects.
            self.memoryx_stub = mgrpc.MemoryXStub(
                fast_channel(channel(self.memoryx_address, security))
            )
            self.memoryx_stub.LoadWeights(
                encode_layer(
                    0,
                    0,
                    pb.FORWARD,
                    {"weight": _layer_weight(num_params, seed)},
                    chunk_bytes=chunk_bytes,
                    sender="bench",
                )
            )
            self.raw_pull = channel(raw_address, security).unary_stream(_RAW_METHOD)
            self.roots = {
                n: sgrpc.SwarmXStub(channel(a, security)) for n, a in root_addresses.items()
            }
        except BaseException:
            self.stop()
            raise

    def _start_all(self, components: list[tuple[str, dict]]) -> list[str]:
        """Start ``(kind, options)`` components; their addresses, in order."""
        if not self.processes:
            addresses = []
            for kind, options in components:
                server, address = _build_server(kind, options)
                self._servers.append(server)
                addresses.append(address)
            return addresses
        ctx = multiprocessing.get_context("spawn")
        started = []
        for kind, options in components:
            parent_end, child_end = ctx.Pipe()
            process = ctx.Process(
                target=_component_process, args=(kind, options, child_end), daemon=True
            )
            process.start()
            self._children.append((process, parent_end))
            started.append((kind, parent_end))
        addresses = []
        for kind, conn in started:
            if not conn.poll(180):
                raise RuntimeError(f"the {kind} process did not start within 180 s")
            addresses.append(conn.recv())
        return addresses

    def stop(self) -> None:
        for server in self._servers:
            server.stop(grace=None)
        for _, conn in self._children:
            with contextlib.suppress(OSError):
                conn.send("stop")
        for process, _ in self._children:
            process.join(timeout=10)
            if process.is_alive():
                process.terminate()

    # -- the three transfers; each returns payload bytes received -------------
    def p2p_memoryx(self) -> int:
        stream = self.memoryx_stub.StreamWeights(
            mpb.WeightsRequest(layer=0, step=0, phase=pb.FORWARD, dtype="float32")
        )
        received = 0
        for item in stream:
            if isinstance(item, Chunk):
                received += len(item.data)
                _read_out(item)
        return received

    def p2p_raw(self) -> int:
        return sum(len(chunk) for chunk in self.raw_pull(b""))

    def swarmx(self, n: int) -> int:
        ack = self.roots[n].RunLayer(
            spb.LayerRequest(layer=0, step=0, phase=pb.FORWARD, dtype="float32")
        )
        if ack.num_nodes != n:
            raise RuntimeError(f"RunLayer reached {ack.num_nodes} sinks, expected {n}")
        return ack.bytes_to_nodes


def _timed(run: Callable[[], int], expected_bytes: int) -> tuple[float, float]:
    """Wall seconds of a transfer and this process's CPU seconds in it (all its threads:
    with the servers as threads, every server's work; with ``--processes`` the client's)."""
    started, started_cpu = time.perf_counter(), time.process_time()
    got = run()
    elapsed, cpu_s = time.perf_counter() - started, time.process_time() - started_cpu
    if got != expected_bytes:
        raise RuntimeError(f"transfer delivered {got} bytes, expected {expected_bytes}")
    return elapsed, cpu_s


def measure(args: argparse.Namespace, transport: str) -> dict:
    """Every transfer's rounds with chunk payloads crossing as ``transport`` says."""
    num_params = args.layer_mb * (1 << 20) // 4
    children = sorted({args.nodes, *args.extra_fanouts})
    with _payloads_through(transport, args) as security:
        setup = Setup(
            num_params=num_params,
            children=children,
            chunk_bytes=args.chunk_bytes,
            seed=args.seed,
            security=security,
            processes=args.processes,
        )
        return _timed_rounds(args, transport, setup, num_params, children)


@contextlib.contextmanager
def _payloads_through(transport: str, args: argparse.Namespace) -> Iterator[Security]:
    """The run's credentials, with a shared-memory plan that this process reads through
    when ``transport`` is shared memory (its segments removed afterwards)."""
    if transport == "grpc":
        yield SECURITY
        return
    plan = SharedMemoryPlan.generate(
        slot_bytes=args.chunk_bytes, ring_bytes=4 * (args.layer_mb << 20)
    )
    shm.activate(plan, writes=False)  # this process reads what MemoryX sends it
    try:
        yield dataclasses.replace(SECURITY, shared_memory=plan)
    finally:
        shm.reset()
        shm.remove_run_segments(plan)


def _timed_rounds(
    args: argparse.Namespace, transport: str, setup: Setup, num_params: int, children: list
) -> dict:
    layer_bytes = setup.layer_bytes
    kinds: dict[str, tuple[Callable[[], int], int]] = {
        "p2p-memoryx": (setup.p2p_memoryx, layer_bytes),
        "p2p-raw": (setup.p2p_raw, layer_bytes),
        **{f"swarmx-{n}": (lambda n=n: setup.swarmx(n), n * layer_bytes) for n in children},
    }
    times: dict[str, list[float]] = {k: [] for k in kinds}
    cpu: dict[str, list[float]] = {k: [] for k in kinds}
    try:
        for run, expected in kinds.values():  # warm-up: connections, allocator
            _timed(run, expected)
        for _ in range(args.repeats):
            for kind, (run, expected) in kinds.items():
                wall_s, cpu_s = _timed(run, expected)
                times[kind].append(wall_s)
                cpu[kind].append(cpu_s)
    finally:
        setup.stop()

    rows = {}
    for kind, (_, delivered) in kinds.items():
        median_s = statistics.median(times[kind])
        links = int(kind.split("-")[1]) if kind.startswith("swarmx") else 1
        rows[kind] = {
            "links": links,
            "delivered_bytes": delivered,
            "median_s": median_s,
            "min_s": min(times[kind]),
            "times_s": times[kind],
            "delivered_MBps": delivered / median_s / MB,
            "per_link_MBps": delivered / links / median_s / MB,
            # CPU seconds per delivered GB (1e9 bytes), median round: steadier than wall
            # time on a shared machine; meaningful for the whole transfer in threads mode.
            "cpu_s_per_GB": statistics.median(cpu[kind]) / delivered * 1e9,
        }
    base = rows["p2p-memoryx"]
    for row in rows.values():
        # Ratio of medians, plus the median of the round-by-round ratios (each
        # round runs every transfer back to back, so they saw similar load).
        paired = [
            (row["delivered_bytes"] / t) / (layer_bytes / b)
            for t, b in zip(row["times_s"], base["times_s"], strict=True)
        ]
        row["aggregate_vs_p2p"] = row["delivered_MBps"] / base["delivered_MBps"]
        row["aggregate_vs_p2p_paired_median"] = statistics.median(paired)
        row["per_link_vs_p2p"] = row["per_link_MBps"] / base["per_link_MBps"]
        row["aggregate_vs_raw"] = row["delivered_MBps"] / rows["p2p-raw"]["delivered_MBps"]
        # What the bytes/s ratio would be if CPU were the only limit.
        row["raw_cpu_per_byte_vs_this"] = rows["p2p-raw"]["cpu_s_per_GB"] / row["cpu_s_per_GB"]
        # Best round over best round: other jobs only ever add time.
        row["aggregate_vs_p2p_best"] = (row["delivered_bytes"] / row["min_s"]) / (
            layer_bytes / base["min_s"]
        )
    return {
        "benchmark": "swarmx",
        "machine": _machine(),
        "layer_bytes": layer_bytes,
        "layer_params": num_params,
        "chunk_bytes": args.chunk_bytes,
        "nodes": args.nodes,
        "repeats": args.repeats,
        "mode": "processes" if args.processes else "threads",
        # How chunk payloads crossed: MemoryX's and SwarmX's shared-memory rings, or gRPC
        # bytes (the raw stream, the baseline of issue 14's ratios, is gRPC bytes in both).
        "transport": transport,
        "baseline": "p2p-memoryx",
        "rows": rows,
        "headline": {
            "aggregate_delivered_vs_p2p": rows[f"swarmx-{args.nodes}"]["aggregate_vs_p2p"],
            "per_link_vs_p2p": rows[f"swarmx-{args.nodes}"]["per_link_vs_p2p"],
            "aggregate_delivered_vs_p2p_best": rows[f"swarmx-{args.nodes}"][
                "aggregate_vs_p2p_best"
            ],
            # Issue 14's targets: against the raw stream of the same bytes.
            "memoryx_vs_raw": rows["p2p-memoryx"]["aggregate_vs_raw"],
            "memoryx_vs_raw_best": rows["p2p-raw"]["min_s"] / rows["p2p-memoryx"]["min_s"],
            "aggregate_delivered_vs_raw": rows[f"swarmx-{args.nodes}"]["aggregate_vs_raw"],
            "aggregate_delivered_vs_raw_best": (
                args.nodes * rows["p2p-raw"]["min_s"] / rows[f"swarmx-{args.nodes}"]["min_s"]
            ),
        },
    }


def _machine() -> dict:
    return {
        "cpus": os.cpu_count(),
        "load_avg_1m": os.getloadavg()[0],
        "python": platform.python_version(),
        "grpc": grpc.__version__,
        "torch": torch.__version__,
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


_TRANSPORT_WORDS = {
    "shared-memory": "shared memory (one host's default)",
    "grpc": "gRPC bytes (between hosts)",
}


def print_table(result: dict) -> None:
    print(
        f"\nlayer {result['layer_bytes'] / (1 << 20):g} MiB ({result['layer_params']:,} fp32 params), "
        f"{result['chunk_bytes'] / (1 << 20):g} MiB chunks, median of {result['repeats']} rounds, "
        f"servers as {result['mode']}"
        f", payloads as {_TRANSPORT_WORDS[result['transport']]}, "
        f"{result['machine']['cpus']} CPUs, "
        f"load {result['machine']['load_avg_1m']:.2f}"
    )
    header = (
        f"{'transfer':<12} {'links':>5} {'median s':>9} {'delivered MB/s':>15} "
        f"{'per-link MB/s':>14} {'aggr/p2p':>9} {'link/p2p':>9} {'best aggr/p2p':>14} "
        f"{'CPU s/GB':>9} {'raw CPU/B / this':>17}"
    )
    print(header)
    print("-" * len(header))
    for kind, row in result["rows"].items():
        print(
            f"{kind:<12} {row['links']:>5} {row['median_s']:>9.3f} {row['delivered_MBps']:>15.1f} "
            f"{row['per_link_MBps']:>14.1f} {row['aggregate_vs_p2p']:>9.2f} "
            f"{row['per_link_vs_p2p']:>9.2f} {row['aggregate_vs_p2p_best']:>14.2f} "
            f"{row['cpu_s_per_GB']:>9.3f} {row['raw_cpu_per_byte_vs_this']:>17.2f}"
        )
    h = result["headline"]
    print(
        f"\nSwarmX to {result['nodes']} nodes: aggregate delivered / p2p = "
        f"{h['aggregate_delivered_vs_p2p']:.2f} (medians; best rounds: "
        f"{h['aggregate_delivered_vs_p2p_best']:.2f}), per link / p2p = "
        f"{h['per_link_vs_p2p']:.2f}; p2p = MemoryX StreamWeights read by one client"
    )
    print(
        f"Against the raw stream: MemoryX StreamWeights / raw = {h['memoryx_vs_raw']:.2f} "
        f"(best rounds {h['memoryx_vs_raw_best']:.2f}); SwarmX aggregate to {result['nodes']} "
        f"nodes / raw = {h['aggregate_delivered_vs_raw']:.2f} "
        f"(best rounds {h['aggregate_delivered_vs_raw_best']:.2f})"
    )


def targets(results: dict[str, dict]) -> list[dict]:
    """Issue 14's two stream targets for each transport measured, from the median rounds."""
    rows = []
    for transport, result in results.items():
        headline = result["headline"]
        for what, key in (
            ("MemoryX StreamWeights / raw", "memoryx_vs_raw"),
            (f"SwarmX aggregate to {result['nodes']} nodes / raw", "aggregate_delivered_vs_raw"),
        ):
            rows.append(
                {
                    "transport": transport,
                    "what": what,
                    "ratio": headline[key],
                    "best_rounds": headline[f"{key}_best"],
                    "target": TARGET_VS_RAW,
                    "met": headline[key] >= TARGET_VS_RAW,
                }
            )
    return rows


def print_targets(rows: list[dict]) -> None:
    print(f"\nIssue 14's targets (at least {TARGET_VS_RAW} of the raw gRPC stream, medians):")
    for row in rows:
        print(
            f"  {_TRANSPORT_WORDS[row['transport']]:<36} {row['what']:<36} "
            f"{row['ratio']:5.2f} (best rounds {row['best_rounds']:.2f})  "
            f"{'met' if row['met'] else 'not met'}"
        )


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="16 MiB layer, 5 rounds")
    parser.add_argument("--layer-mb", type=int, default=None, help="layer size, MiB (default 64)")
    parser.add_argument("--nodes", type=int, default=4, help="sink children of the root")
    parser.add_argument(
        "--extra-fanouts",
        type=int,
        nargs="*",
        default=[1],
        help="other fan-outs to time as well (default: 1, the cost of the extra hop alone)",
    )
    parser.add_argument(
        "--repeats", type=int, default=None, help="timed rounds (default 20; --quick 5)"
    )
    parser.add_argument(
        "--processes",
        action="store_true",
        help="run every server in its own process (as the Ray actors do) instead of threads",
    )
    parser.add_argument(
        "--transport",
        choices=("both", *TRANSPORTS),
        default="both",
        help="how MemoryX and SwarmX send chunk payloads: through shared memory (a run's "
        "default between processes of one host, runtime.shared_memory: auto), as gRPC "
        "bytes (between hosts), or both, one after the other (default); the raw stream "
        "is gRPC bytes in every case",
    )
    parser.add_argument("--chunk-bytes", type=int, default=DEFAULT_CHUNK_BYTES)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args(argv)
    if args.layer_mb is None:
        args.layer_mb = 16 if args.quick else 64
    if args.repeats is None:
        args.repeats = 5 if args.quick else 20
    if args.layer_mb < 1 or args.repeats < 1 or args.nodes < 1:
        parser.error("--layer-mb, --repeats and --nodes must each be at least 1")
    transports = TRANSPORTS if args.transport == "both" else (args.transport,)
    results = {}
    for transport in transports:
        results[transport] = measure(args, transport)
        print_table(results[transport])
    met = targets(results)
    print_targets(met)
    result = {"benchmark": "swarmx", "transports": results, "targets": met}
    if args.json is not None:
        write_json_atomic(args.json, result)
        print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    main()
