"""``wafer scale``: the scaling experiment on the command line.

    wafer scale --model mlp-digits --nodes 1,2,4,8 --steps 5 --json scale.json --plot scale.png

``emulator.cli`` registers it with ``add_scale_parser``. Bad input raises
``ValueError``, which the caller prints as one paragraph (exit status 2).
"""

from __future__ import annotations

import argparse

from core.units import format_seconds
from emulator.cli_cost import parse_node_counts
from emulator.config import load_config
from emulator.zoo import ZOO

#: ``wafer scale``'s own defaults where ``wafer train``'s would make a sweep slow.
DEFAULT_STEPS = 5


def add_scale_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "scale",
        help="train the same model at several cluster sizes: emulated vs predicted step time, "
        "the emulator's wall time and memory",
        description="Run the same model functionally at each node count with one global batch.",
    )
    p.add_argument("--model", required=True, help=f"zoo model ({', '.join(ZOO)}) or module:factory")
    p.add_argument(
        "--nodes", required=True, help="node counts: '1,2,4,8', '1-16' or '8-64:8' (as simulate)"
    )
    p.add_argument("--config", metavar="FILE", help="YAML cluster config; flags override it")
    p.add_argument("--backend", help="compute-node backend: cs2 | pcm | photonic")
    p.add_argument(
        "--steps", type=int, metavar="K", help=f"steps per size (default {DEFAULT_STEPS})"
    )
    p.add_argument(
        "--batch-size", type=int, metavar="B", help="global batch, the same at every size"
    )
    p.add_argument("--hardware", metavar="PRESET", help="emulated hardware: cs2 | cs3 | YAML path")
    p.add_argument("--seed", type=int)
    p.add_argument(
        "--nodes-per-process",
        metavar="auto|N",
        help="emulated nodes each actor process hosts (default auto)",
    )
    p.add_argument(
        "--address", metavar="ADDR", help="existing Ray cluster; default: start a local one"
    )
    p.add_argument(
        "--repeats",
        type=int,
        default=1,
        metavar="R",
        help="run every size R times, in alternating order; wall time per step is their "
        "median, the table shows their range (default 1)",
    )
    p.add_argument("--json", metavar="PATH", help="write points[] as JSON (after every size)")
    p.add_argument("--plot", metavar="PNG", help="plot emulated vs predicted step time")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.set_defaults(func=run_scale_command)
    return p


def _nodes_per_process(text: str | None) -> int | str | None:
    if text is None or text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise ValueError(
            f"--nodes-per-process {text!r} is not valid; give 'auto' or a positive integer."
        ) from None


def run_scale_command(args: argparse.Namespace) -> int:
    from emulator.scale import check_repeats, plot_scale, run_scale, scale_table

    node_counts = parse_node_counts(args.nodes)
    check_repeats(args.repeats)
    overrides = {
        "model.name": args.model,
        "num_nodes": node_counts[0],
        "num_steps": args.steps or DEFAULT_STEPS,
        # Train's eval runs once, at the end: a small test set keeps every size quick.
        "max_eval_samples": max(node_counts),
    }
    flags = {
        "backend.kind": args.backend,
        "batch_size": args.batch_size,
        "hardware.preset": args.hardware,
        "seed": args.seed,
        "runtime.address": args.address,
        "runtime.nodes_per_process": _nodes_per_process(args.nodes_per_process),
    }
    overrides.update({k: v for k, v in flags.items() if v is not None})
    config = load_config(args.config, overrides)
    if config.num_steps < 2:
        raise ValueError(
            f"--steps {config.num_steps} is too few; wall time per step is measured after the "
            "first step (which pays for connections), so use --steps 2 or more."
        )

    def report(point) -> None:
        if not args.quiet:
            print(
                f"  {point.nodes} nodes: emulated step {format_seconds(point.emulated_step_time_s)}, "
                f"wall {format_seconds(point.wall_step_time_s)}/step, first step after "
                f"{point.time_to_first_step_s:.1f} s",
                flush=True,
            )

    points, failed = run_scale(
        config, node_counts, repeats=args.repeats, json_path=args.json, on_point=report
    )
    if points:
        print(scale_table(config, points))
    if args.json:
        print(f"wrote {args.json}")
    if args.plot and points:
        plot_scale(
            points,
            args.plot,
            title=f"{config.model.name} on {config.backend.kind}: global batch {config.batch_size}",
        )
        print(f"wrote {args.plot}")
    if failed is not None:
        again = f" (repeat {failed['repeat'] + 1})" if args.repeats > 1 else ""
        print(f"wafer scale: {failed['nodes']} nodes did not run{again}: {failed['error']}")
        return 1
    return 0


def runtime_rows(runtime: dict | None) -> list[tuple[str, str]]:
    """``wafer train``'s summary rows of the JSON ``runtime`` block (launch cost, memory)."""
    from emulator.table import human_bytes

    if not runtime:
        return []
    memory = runtime["memory"]
    first = runtime["time_to_first_step_s"]
    return [
        (
            "launch / first step",
            f"{runtime['launch_time_s']:.1f} s / "
            + (f"{first:.1f} s after the run started" if first is not None else "-"),
        ),
        (
            "emulator processes",
            f"{runtime['num_processes']} for {runtime['num_emulated_nodes']} compute and SwarmX "
            f"nodes (+ MemoryX), {runtime['nodes_per_process']} per process",
        ),
        (
            "emulator peak memory",
            f"{human_bytes(memory['peak_bytes'])} PSS (driver, MemoryX, hosts; "
            f"{human_bytes(memory['peak_rss_bytes'])} summed RSS); "
            f"{human_bytes(memory['per_emulated_node_bytes'])} per emulated node",
        ),
    ]
