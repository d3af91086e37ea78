"""``wafer eval`` and ``wafer compare``: PCM accuracy over drift time, and backends side by side.

The ``wafer`` CLI registers these with ``add_eval_parser`` / ``add_compare_parser``. The
logic and its Python API live in ``emulator.compare``.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

from emulator.compare import (  # noqa: E402 (gRPC reads its verbosity at import)
    check_drift_backend,
    compare_backends,
    drift_eval,
    trained_weights,
    write_outputs,
)
from emulator.config import load_config  # noqa: E402

DEFAULT_DRIFT_TIMES = "1,3600,86400,31536000"


def _number_list(text: str, name: str, convert=float) -> list:
    try:
        values = [convert(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"{name} = {text!r} is not a comma-separated list of numbers.") from None
    if not values:
        raise ValueError(f"{name} = {text!r} names nothing; give at least one value.")
    return values


def add_eval_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "eval",
        help="accuracy of a model programmed onto PCM, over time after programming",
        description=(
            "Trains the model hardware-aware on the PCM backend over the real cluster (or "
            "loads a MemoryX checkpoint), programs the trained weights once onto PCM arrays "
            "(weight-stationary) and evaluates the test set at each time after programming, "
            "with and without global drift compensation. The inference runs in this process "
            "with the plain-torch physics, through the same PcmBackend and NodeWorker code "
            "as a cluster node; no cluster is needed for it."
        ),
    )
    p.add_argument("--config", metavar="FILE", help="YAML cluster config; flags override it")
    p.add_argument("--backend", default="pcm", help="backend to evaluate on (pcm)")
    p.add_argument("--model", default="mlp-digits", help="zoo model or module:factory")
    p.add_argument(
        "--drift-times",
        default=DEFAULT_DRIFT_TIMES,
        metavar="T1,T2,...",
        help=f"seconds after programming to evaluate at (default {DEFAULT_DRIFT_TIMES})",
    )
    p.add_argument("--steps", type=int, default=200, metavar="K", help="training steps")
    p.add_argument("--nodes", type=int, default=2, metavar="N", help="compute nodes for training")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--checkpoint", metavar="PATH", help="MemoryX checkpoint to load instead of training"
    )
    p.add_argument("--json", metavar="PATH", help="write the result as JSON (atomically)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_eval)


def _cmd_eval(args: argparse.Namespace) -> int:
    times = _number_list(args.drift_times, "--drift-times")
    config = load_config(
        args.config,
        {
            "backend.kind": args.backend,
            "model.name": args.model,
            "num_steps": args.steps,
            "num_nodes": args.nodes,
            "seed": args.seed,
        },
    )
    check_drift_backend(config)
    weights = trained_weights(config, args.checkpoint, progress=not args.quiet)
    result = drift_eval(config, times, weights)
    print(result.table())
    for path in write_outputs(result, args.json):
        print(f"wrote {path}")
    return 0


def add_compare_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "compare",
        help="train one model on several backends and compare accuracy, time and energy",
        description=(
            "Runs the same model, seed and data on each backend over the real cluster and "
            "prints accuracy, emulated time, energy, energy per sample and achieved TOPS/W. "
            "Every row's time and energy is the run's emulated clock: the measured step on the "
            "preset's MemoryX and SwarmX, with the nodes costed by their backend's engine (the "
            "wafer; PCM programming, analog MVMs and a digital unit; photonic reconfiguration, "
            "optical MVMs and a digital unit). TOPS/W counts the model's training FLOPs per joule "
            "of the whole cluster, node TOPS/W per joule of the compute nodes alone."
        ),
    )
    p.add_argument("--config", metavar="FILE", help="YAML cluster config; flags override it")
    p.add_argument(
        "--backends",
        default="cs2,pcm",
        help="comma-separated backends, each KIND or KIND:TRAINING "
        "(e.g. cs2,pcm,photonic,photonic:ffm,photonic:dfa)",
    )
    p.add_argument("--model", default="mlp-digits", help="zoo model or module:factory")
    p.add_argument("--steps", type=int, default=100, metavar="K", help="training steps each")
    p.add_argument("--nodes", type=int, default=2, metavar="N", help="compute nodes")
    p.add_argument(
        "--node-groups",
        metavar="GROUPS",
        help="also train a mixed cluster, KIND[@PRESET]:N,... (e.g. cs2:1,pcm:1), and show "
        "its row beside the pure ones",
    )
    p.add_argument("--balance", choices=["equal", "throughput"], help="the mixed row's shares")
    p.add_argument("--batch-size", type=int, default=128, metavar="B", help="global batch")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="PATH", help="write the rows as JSON (atomically)")
    p.add_argument("--plot", metavar="PNG", help="write a bar chart (atomically)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_compare)


def _cmd_compare(args: argparse.Namespace) -> int:
    backends = _number_list(args.backends, "--backends", convert=str.strip)
    result = compare_backends(
        backends,
        model=args.model,
        num_steps=args.steps,
        num_nodes=args.nodes,
        batch_size=args.batch_size,
        seed=args.seed,
        config_path=args.config,
        progress=not args.quiet,
        node_groups=args.node_groups,
        balance=args.balance,
    )
    print(result.table())
    for path in write_outputs(result, args.json, args.plot):
        print(f"wrote {path}")
    return 0
