"""``wafer simulate`` and ``wafer validate``: the analytic cost model on the command line.

    wafer simulate --model gpt3-175b --nodes 1-192 --hardware cs2 --plot scaling.png
    wafer validate

``emulator.cli`` registers both with ``add_simulate_parser`` and
``add_validate_parser``.
Handlers raise ``ValueError`` for bad input, which the caller prints as one
paragraph and turns into exit status 2.
"""

from __future__ import annotations

import argparse
import dataclasses

from core.atomic import write_json_atomic
from core.config import to_dict, yaml_text
from core.cost.workload import Workload
from core.precision import PRECISIONS
from core.presets import list_presets, load_hardware
from core.units import format_count, format_energy, format_seconds
from emulator.cost.gpt import GPT_SPECS, gpt_workload
from emulator.cost.stats import (
    LINEAR_SCALING_THRESHOLD,
    StepStats,
    first_nonlinear,
    simulate,
    sweep,
)
from emulator.table import format_table, human_bytes
from nodes.backend import Backend
from nodes.photonic.training import TRAINING_METHODS

#: Batch of zoo models when --batch is not given: ``wafer train``'s default batch_size.
ZOO_DEFAULT_BATCH = 128


def parse_node_counts(text: str) -> list[int]:
    """'1,2,4', '1-192' (quarter steps per doubling: 1,2,3,...,8,10,12,14,16,20,...,192) or '8-64:8'."""
    counts: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        try:
            if "-" in part:
                span, _, step = part.partition(":")
                low, high = (int(v) for v in span.split("-", 1))
                if low < 1 or high < low:
                    raise ValueError
                if step:
                    counts.update(range(low, high + 1, int(step)))
                else:
                    # Four points per doubling: dense enough to see where scaling bends.
                    ladder = {
                        (4 + quarter) * 2**k // 4
                        for k in range(high.bit_length() + 1)
                        for quarter in range(4)
                    }
                    counts.update(n for n in ladder if low <= n <= high)
                counts.update((low, high))
            else:
                counts.add(int(part))
        except ValueError:
            raise ValueError(
                f"--nodes {text!r} is not valid; give counts like '1,2,4', a range '1-192' "
                "or a stepped range '8-64:8' (positive integers, low <= high)."
            ) from None
    if min(counts) < 1:
        raise ValueError(f"--nodes {text!r} is not valid; node counts must be >= 1.")
    return sorted(counts)


def _zoo_workload(name: str, batch: int | None, seq: int | None, precision: str) -> Workload | None:
    import torch

    from core.cost.profile import profile_modules
    from emulator.zoo import ZOO, ModelConfig, default_data_config

    if name not in ZOO:
        return None
    config = ModelConfig(name=name, seq_len=seq) if seq is not None else ModelConfig(name=name)
    shape = config.gpt_shape
    if shape is not None:
        example = torch.zeros(2, shape.seq_len, dtype=torch.long)
    else:
        example = default_data_config(config).build(seed=0).input_example(2)
    model = config.build(seed=0)
    return profile_modules(
        name,
        [(f"block{i}", block) for i, block in enumerate(model)],
        example,
        samples_per_step=batch or ZOO_DEFAULT_BATCH,
        precision=precision,
        tokens_per_sample=shape.seq_len if shape is not None else 1,
    )


def resolve_workload(name: str, batch: int | None, seq: int | None, precision: str) -> Workload:
    """A GPT size by name, or a zoo model profiled with torch's FLOP counter."""
    if name in GPT_SPECS:
        return gpt_workload(name, batch_size=batch, seq_len=seq, precision=precision)
    workload = _zoo_workload(name, batch, seq, precision)
    if workload is None:
        from emulator.zoo import ZOO

        raise ValueError(
            f"Unknown model {name!r}; choose a GPT size ({', '.join(GPT_SPECS)}) "
            f"or a zoo model ({', '.join(sorted(ZOO))})."
        )
    return workload


def _memory_fit(stats: StepStats) -> str:
    used = f"{human_bytes(stats.activation_bytes_per_node)}/{human_bytes(stats.activation_budget_bytes)}"
    return used if stats.num_micro_batches == 1 else f"{used} x{stats.num_micro_batches} mb"


def simulate_table(results: list[StepStats], workload: Workload, threshold: float) -> str:
    rate = "tokens/s" if workload.tokens_per_sample > 1 else "samples/s"
    rows = []
    for s in results:
        rows.append(
            [
                s.num_nodes,
                format_seconds(s.step_time_s),
                f"{s.tokens_per_s if workload.tokens_per_sample > 1 else s.samples_per_s:.4g}",
                f"{s.speedup:.2f}",
                f"{s.scaling_efficiency:.1%}",
                "yes" if s.scaling_efficiency >= threshold else "NO",
                f"{s.compute_utilization:.1%}",
                s.bound,
                format_energy(s.energy_j),
                _memory_fit(s),
            ]
        )
    first = results[0]
    title = (
        f"wafer simulate: {workload.name} ({format_count(workload.num_params)} parameters), "
        f"batch {workload.samples_per_step} x {workload.tokens_per_sample} tokens, "
        f"{workload.precision}, on {first.hardware} with {first.node} nodes; MemoryX state "
        f"{human_bytes(first.model_state_bytes)} in a {human_bytes(first.memoryx_capacity_bytes)} "
        "MemoryX"
    )
    headers = [
        "nodes",
        "step time",
        rate,
        "speedup",
        "efficiency",
        f"linear (>={threshold:.0%})",
        "compute util",
        "bound",
        "energy/step",
        "activations/SRAM",
    ]
    return format_table(headers, rows, title=title)


def scaling_verdict(results: list[StepStats], threshold: float) -> str:
    knee = first_nonlinear(results, threshold)
    if knee is None:
        return (
            f"Scaling stays linear (efficiency >= {threshold:.0%}) up to "
            f"{results[-1].num_nodes} systems."
        )
    below = [s for s in results if s.num_nodes < knee.num_nodes]
    last_linear = below[-1].num_nodes if below else 1
    previous_stream = below[-1].stream_bound_fraction if below else 0.0
    if knee.stream_bound_fraction >= 0.5 and knee.num_micro_batches > 1:
        reason = (
            "the step is stream-bound, so its time follows the number of micro-batches, "
            "which shrinks more slowly than each system's share"
        )
    elif knee.stream_bound_fraction >= 0.5 or knee.stream_bound_fraction > previous_stream:
        reason = "each system's share is too small to hide the weight stream behind compute"
    else:
        reason = "the exposed update and tree latency weigh more as the per-system work shrinks"
    stays_below = next(
        (
            s.num_nodes
            for i, s in enumerate(results)
            if all(t.scaling_efficiency < threshold for t in results[i:])
        ),
        None,
    )
    recovery = (
        f" It recovers at some sizes whose share splits into micro-batches more evenly and "
        f"stays below from N={stays_below}."
        if stays_below not in (None, knee.num_nodes)
        else ""
    )
    return (
        f"Scaling efficiency drops below {threshold:.0%} at N={knee.num_nodes} "
        f"({knee.scaling_efficiency:.1%}; linear up to N={last_linear}): "
        f"{knee.samples_per_node} samples per system in {knee.num_micro_batches} micro-batch(es), "
        f"{knee.stream_bound_fraction:.0%} of wafer time stream-bound; {reason}.{recovery}"
    )


def parse_overrides(pairs: list[str]) -> dict[str, object]:
    """``KEY=VALUE`` pairs; values are read as YAML, so numbers and lists keep their type."""
    overrides = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key:
            raise ValueError(
                f"--set {pair!r} is not valid; write a dotted preset field and a value, "
                "e.g. --set wafer.compute_efficiency=0.4."
            )
        overrides[key.strip()] = yaml_text(text)  # 1e-5 is a float (YAML 1.2's reading)
    return overrides


def sparsity_table(points: list, workload: Workload, hardware) -> str:
    """The emulated speedup curve: one row per sparsity and node count."""
    rows = [
        [
            f"{point.sparsity:g}",
            point.stats.num_nodes,
            format_seconds(point.stats.step_time_s),
            f"{point.speedup:.2f}x",
            human_bytes(point.bytes_per_step),
            f"{point.stats.compute_utilization:.1%}",
            point.stats.bound,
        ]
        for point in points
    ]
    wafer = hardware.wafer
    title = (
        f"wafer simulate: {workload.name} with unstructured weight sparsity, batch "
        f"{workload.samples_per_step} x {workload.tokens_per_sample} tokens, {workload.precision}, "
        f"on {hardware.name}; wafer sparse speedup capped at {wafer.max_sparse_speedup:g}x "
        f"(efficiency {wafer.sparse_speedup_efficiency:g})"
    )
    headers = ["sparsity", "nodes", "step time", "speedup vs dense", "bytes/step", "util", "bound"]
    return format_table(headers, rows, title=title)


def node_backend(args: argparse.Namespace):
    """The nodes' backend config: ``--config``'s ``backend:`` section, then ``--backend``/``--training``."""
    from emulator.config import load_config

    overrides = {}
    if args.backend is not None:
        overrides["backend.kind"] = args.backend
    if args.training is not None:
        overrides["backend.training"] = args.training
    return load_config(args.config, overrides).backend


def node_parts_line(stats: StepStats) -> str:
    """Where one node's time goes, for engines with parts (programming, MVMs, digital)."""
    parts = ", ".join(
        f"{part} {format_seconds(seconds)}" for part, seconds in stats.node_time_by_part_s.items()
    )
    return f"one node's busy time per step on {stats.num_nodes} nodes: {parts}"


def _simulate_sparsity(args, workload: Workload, hardware, engine) -> int:
    from emulator.cost.sparsity import parse_sparsities, sparsity_curve

    sparsities = parse_sparsities(args.sparsity)
    # A speedup curve per cluster size: one system unless --nodes says otherwise.
    points = [
        point
        for n in parse_node_counts(args.nodes or "1")
        for point in sparsity_curve(workload, hardware, n, sparsities, engine=engine)
    ]
    print(sparsity_table(points, workload, hardware))
    if args.json:
        write_json_atomic(
            args.json,
            {
                "model": workload.name,
                "node": engine.name,
                "hardware": to_dict(hardware),
                "points": [
                    {
                        **p.stats.to_json(),
                        "sparsity": p.sparsity,
                        # Against the dense model on the same nodes, not against one node.
                        "speedup": p.speedup,
                        "bytes_per_step": p.bytes_per_step,
                    }
                    for p in points
                ],
            },
        )
        print(f"wrote {args.json}")
    if args.plot:
        from emulator.cost.plot import plot_sparsity

        plot_sparsity(points, args.plot, title=f"{workload.name} on {engine.name}")
        print(f"wrote {args.plot}")
    return 0


def run_simulate(args: argparse.Namespace) -> int:
    hardware = load_hardware(args.hardware, parse_overrides(args.set))
    backend = node_backend(args)
    engine = backend.engine(hardware)
    workload = resolve_workload(args.model, args.batch, args.seq, args.precision)
    if args.node_groups is not None:
        from emulator.cli_groups import run_simulate_groups

        preset = {"preset": args.hardware, "overrides": parse_overrides(args.set)}
        return run_simulate_groups(args, workload, preset)
    if args.sparsity is not None:
        return _simulate_sparsity(args, workload, hardware, engine)
    node_counts = parse_node_counts(args.nodes or "1-192")
    results = sweep(workload, hardware, node_counts, engine=engine)
    print(simulate_table(results, workload, args.threshold))
    if results[0].node_time_by_part_s.keys() - {"compute"}:
        print(node_parts_line(results[0]))
    print(scaling_verdict(results, args.threshold))
    if args.json:
        write_json_atomic(
            args.json,
            {
                "model": workload.name,
                "num_params": workload.num_params,
                "samples_per_step": workload.samples_per_step,
                "tokens_per_sample": workload.tokens_per_sample,
                "precision": workload.precision,
                "node": engine.name,
                "backend": to_dict(backend),
                "deployment": dataclasses.asdict(engine.deployment(workload)),
                "hardware": to_dict(hardware),
                "linear_threshold": args.threshold,
                "nonlinear_from_nodes": getattr(
                    first_nonlinear(results, args.threshold), "num_nodes", None
                ),
                "results": [s.to_json() for s in results],
            },
        )
        print(f"wrote {args.json}")
    if args.plot:
        from emulator.cost.plot import plot_scaling

        title = (
            f"{workload.name} on {args.hardware} ({engine.name}): batch "
            f"{workload.samples_per_step} x {workload.tokens_per_sample} tokens"
        )
        plot_scaling(results, args.plot, threshold=args.threshold, title=title)
        print(f"wrote {args.plot}")
    if args.trace:
        from emulator.cost.trace import write_trace

        trace_nodes = args.trace_nodes or node_counts[-1]
        _, timeline = simulate(workload, hardware, trace_nodes, engine=engine, record_events=True)
        write_trace(timeline.events, args.trace)
        print(
            f"wrote {args.trace} ({trace_nodes} systems, {len(timeline.events)} events); open it "
            "in https://ui.perfetto.dev or chrome://tracing"
        )
    return 0


def add_simulate_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "simulate",
        help="predict step time, throughput, scaling and energy with the analytic cost model",
        description="Predict one training step on 1..N emulated systems (no numerics run).",
    )
    p.add_argument(
        "--model",
        default="gpt3-175b",
        help=f"GPT size ({', '.join(GPT_SPECS)}) or a zoo model (e.g. mlp-digits, gpt-tiny)",
    )
    p.add_argument(
        "--nodes",
        default=None,
        help="node counts: '1,2,4,8', '1-192' (1,2,3,...,8,10,12,14,16,20,...) or '8-64:8' (default 1-192)",
    )
    p.add_argument(
        "--hardware", default="cs2", help=f"preset ({', '.join(list_presets())}) or YAML path"
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a preset field, e.g. --set wafer.compute_efficiency=0.4 (repeatable)",
    )
    p.add_argument(
        "--batch", type=int, help="global batch, samples (default: the model's published batch)"
    )
    p.add_argument(
        "--seq", type=int, help="sequence length, tokens (GPT models; default: the model's)"
    )
    p.add_argument("--precision", default="fp16", choices=list(PRECISIONS))
    p.add_argument(
        "--backend",
        choices=sorted(Backend.Config.variants()),
        help="what computes on each node: the preset's wafer (cs2, default), PCM crossbars or "
        "photonic meshes; MemoryX and SwarmX stay the preset's",
    )
    p.add_argument(
        "--training",
        choices=sorted(TRAINING_METHODS),
        help="photonic training method (what runs optically; default backprop)",
    )
    p.add_argument(
        "--config",
        metavar="YAML",
        help="cluster YAML whose backend section configures the nodes (tile size, phases, ...)",
    )
    p.add_argument(
        "--node-groups",
        metavar="GROUPS",
        help="a heterogeneous cluster instead of --nodes: KIND[@PRESET]:N,... e.g. cs2:2,pcm:2; "
        "prints each group's share, time, idle time and energy",
    )
    p.add_argument(
        "--balance",
        choices=["equal", "throughput"],
        help="batch shares of --node-groups (default equal)",
    )
    p.add_argument(
        "--threshold",
        type=float,
        default=LINEAR_SCALING_THRESHOLD,
        help="scaling efficiency below which scaling counts as non-linear (default 0.9)",
    )
    p.add_argument(
        "--sparsity",
        metavar="S[,S...]",
        help="weight sparsities to compare, e.g. 0,0.5,0.75,0.9: prints the emulated speedup "
        "curve (step time, speedup vs dense, bytes per step; default --nodes 1)",
    )
    p.add_argument("--json", metavar="PATH", help="write all results as JSON")
    p.add_argument("--plot", metavar="PNG", help="write speedup and efficiency vs nodes")
    p.add_argument("--trace", metavar="PATH", help="write a Chrome-trace JSON of one step")
    p.add_argument(
        "--trace-nodes",
        type=int,
        metavar="N",
        help="cluster size of the trace (default: the largest)",
    )
    p.set_defaults(func=run_simulate)
    return p


def validate_table(checks) -> str:
    rows = []
    for check in checks:
        ref = check.reference
        rows.append(
            [
                ref.id,
                f"{ref.value:.4g}",
                f"{check.predicted:.4g}",
                f"{check.error:.1%}",
                f"{ref.tolerance:.0%}",
                "ok" if check.passed else "FAIL",
                ref.claim,
            ]
        )
    headers = ["reference", "published", "predicted", "error", "tolerance", "", "claim"]
    return format_table(headers, rows)


def run_validate(args: argparse.Namespace) -> int:
    from emulator.cost.validate import REFERENCES_PATH, run_checks

    checks = run_checks(args.references or REFERENCES_PATH)
    validation = [c for c in checks if c.reference.role == "validation"]
    calibration = [c for c in checks if c.reference.role == "calibration"]
    if not validation:
        raise ValueError(f"{args.references} holds no entry with role: validation.")
    print("wafer validate: published figures vs the cost model")
    print(validate_table(validation))
    errors = [c.error for c in validation]
    failed = [c.reference.id for c in validation if not c.passed]
    print(
        f"{len(validation)} figures: mean error {sum(errors) / len(errors):.1%}, "
        f"max error {max(errors):.1%}; "
        + ("all within tolerance." if not failed else f"outside tolerance: {', '.join(failed)}.")
    )
    print("Sources:")
    for c in validation:
        print(f"  {c.reference.id}: {c.reference.source}")
    if calibration:
        print()
        print("Calibration figures (the presets were derived from them; not counted):")
        print(validate_table(calibration))
    return 1 if failed else 0


def add_validate_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "validate",
        help="compare the cost model with published figures",
        description="Table of published figures vs predictions; exits 1 if one is out of tolerance.",
    )
    p.add_argument(
        "--references", metavar="YAML", help="reference figures (default: the bundled file)"
    )
    p.set_defaults(func=run_validate)
    return p


__all__ = [
    "add_simulate_parser",
    "add_validate_parser",
    "parse_node_counts",
    "parse_overrides",
    "resolve_workload",
    "run_simulate",
    "run_validate",
]
