"""The ``wafer`` command line.

    wafer train [--config FILE] [--model NAME] [--nodes N] [--steps K] ...

Bad input (an unknown key, an impossible value) prints one paragraph naming
the field and exits with status 2; it never shows a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys

# gRPC's C-core reads its log level once, when grpc is first imported (below, through
# the config imports), so it is decided here. Its chatter (peer shutdowns, GOAWAY
# frames as a cluster stops) is about the wire, not the run: shown only with
# --verbose, unless the user's environment sets GRPC_VERBOSITY itself.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR" if "--verbose" in sys.argv[1:] else "NONE")

from emulator import early_ray  # noqa: E402 (standard library only)
from emulator.address import fail_fast  # noqa: E402 (standard library only)

if __name__ == "__main__" or os.path.basename(sys.argv[0]) == "wafer":
    # The console script: an address nothing answers at fails before torch loads (seconds).
    fail_fast(sys.argv[1:])
    # A local Ray starts while torch and the emulator load (seconds saved to the first step).
    early_ray.start(sys.argv[1:])

from core.atomic import write_json_atomic
from core.data import SHIPPED_DATA
from core.units import format_energy, format_seconds
from emulator.cli_compare import add_compare_parser, add_eval_parser
from emulator.cli_cost import add_simulate_parser, add_validate_parser
from emulator.cli_scale import add_scale_parser, runtime_rows
from emulator.config import CLI_FIELDS, load_config
from emulator.table import format_table, human_bytes
from emulator.zoo import ZOO


def _add_train_parser(subparsers) -> None:
    p = subparsers.add_parser("train", help="train a model on an emulated weight-streaming cluster")
    p.add_argument("--config", metavar="FILE", help="YAML cluster config; flags override it")
    p.add_argument(
        "--model",
        help=f"zoo model ({', '.join(ZOO)}) or module:factory",
    )
    p.add_argument(
        "--data",
        metavar="PATH",
        help="data: digits | synthetic-tokens | text, a .npz file (arrays x, y; optional "
        "x_test, y_test), a .bin file of uint16 token ids, or module:factory returning "
        "(train, test) torch Datasets; default: the model's own",
    )
    p.add_argument(
        "--seq-len", type=int, metavar="T", help="tokens per sequence of --data's token windows"
    )
    p.add_argument("--nodes", type=int, metavar="N", help="compute nodes")
    p.add_argument(
        "--node-groups",
        metavar="GROUPS",
        help="heterogeneous cluster: KIND[@PRESET]:N,... e.g. cs2:2,pcm:2 or cs2:2,cs2@cs3:2",
    )
    p.add_argument(
        "--balance",
        help="batch shares of node groups: equal | throughput (by each group's emulated speed)",
    )
    p.add_argument("--steps", type=int, metavar="K", help="training steps")
    p.add_argument("--batch-size", type=int, metavar="B", help="global batch, samples per step")
    p.add_argument("--optimizer", help="sgd | adam | adamw")
    p.add_argument("--lr", type=float, metavar="X", help="learning rate")
    p.add_argument("--precision", help="fp32 | bf16 | fp16 (cs2 backend)")
    p.add_argument("--backend", help="compute-node backend: cs2 | pcm | photonic")
    p.add_argument(
        "--training",
        help="photonic training method: backprop (twin, deployed) | dfa | ffm (in situ)",
    )
    p.add_argument("--seed", type=int)
    p.add_argument(
        "--address", metavar="ADDR", help="existing Ray cluster; default: start a local one"
    )
    p.add_argument(
        "--save-checkpoint", metavar="PATH", help="write a MemoryX checkpoint at the end"
    )
    p.add_argument(
        "--resume",
        metavar="PATH|DIR|auto",
        help="start from a MemoryX checkpoint file, or continue the run whose periodic "
        "checkpoints are in DIR (auto: checkpoint.dir) to its end",
    )
    p.add_argument(
        "--hardware",
        metavar="PRESET",
        help="emulated hardware the run reports on: cs2 | cs3 | path of a preset YAML file",
    )
    p.add_argument(
        "--sparsity",
        type=float,
        metavar="S",
        help="fraction of each weight matrix pruned, in [0, 1) (per-pattern lists: YAML groups)",
    )
    p.add_argument(
        "--sparsity-algorithm",
        metavar="ALG",
        help="static | gmp | set | rigl (dynamic ones need update: {freq, start, stop} in YAML)",
    )
    p.add_argument("--json", metavar="PATH", help="write the full report as JSON")
    p.add_argument(
        "--trace",
        metavar="PATH",
        help="write a Chrome-trace JSON of one emulated step (open in https://ui.perfetto.dev)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument(
        "--verbose",
        action="store_true",
        default=None,
        help="show Ray's warnings and gRPC's C-core logs (hidden by default)",
    )
    p.set_defaults(func=_cmd_train)


def _overrides(args: argparse.Namespace) -> dict:
    overrides = {
        dotted: getattr(args, flag)
        for flag, dotted in CLI_FIELDS.items()
        if getattr(args, flag, None) is not None
    }
    data = getattr(args, "data", None)
    if data is not None:
        # A shipped data set by name; anything else is the user's file or factory.
        overrides["data.name" if data in SHIPPED_DATA else "data.path"] = data
    return overrides


def _check_seq_len_flag(args: argparse.Namespace, config) -> None:
    data = config.data
    if args.seq_len is not None and (data is None or (data.path is None and data.name == "digits")):
        raise ValueError(
            f"--seq-len {args.seq_len} sets the length of token windows, but the run's data "
            "(digits) has none; give sequence data too, e.g. --data tokens.bin or --data text."
        )


def _cmd_train(args: argparse.Namespace) -> int:
    from emulator.faults import RunFailed
    from emulator.stopping import RunStopped, StopSignals, resume_command
    from emulator.train import train

    config = load_config(args.config, _overrides(args))
    _check_seq_len_flag(args, config)
    with StopSignals() as stop:
        try:
            # The report file holds no weights: they are not read back into this process.
            report = train(config, progress=not args.quiet, stop=stop, final_weights=False)
        except RunStopped as stopped:
            # The steps done are reported as a finished run's would be.
            _write_report(args, stopped.report)
            print(f"wafer train: stopped: {stopped}", file=sys.stderr)
            if stopped.checkpoint is not None:
                command = resume_command(args.argv, stopped.checkpoint, stopped.steps_left)
                print(f"wafer train: wrote {stopped.checkpoint}; resume with:\n  {command}")
            return stopped.exit_status
        except RunFailed as failed:
            # One paragraph, no traceback; the finished steps and a checkpoint are kept.
            kept = []
            if args.json and failed.partial is not None:
                write_json_atomic(args.json, failed.partial)
                kept.append(
                    f"the report of the {len(failed.partial['steps'])} steps done is in {args.json}"
                )
            if failed.checkpoint:
                kept.append(f"a checkpoint is in {failed.checkpoint} (continue with --resume)")
            else:
                kept.append("no checkpoint was kept (set checkpoint.dir to keep one)")
            print(f"wafer train: error: {failed} Kept: {'; '.join(kept)}.", file=sys.stderr)
            return 1
    _write_report(args, report)
    return 0


def _write_report(args: argparse.Namespace, report) -> None:
    result = report.to_json()
    print(summary(result))
    if args.json:
        write_json_atomic(args.json, result)
        print(f"wrote {args.json}")
    if args.trace and report.emulated is not None:
        report.write_trace(args.trace)
        print(
            f"wrote {args.trace} (one emulated step); open it in https://ui.perfetto.dev "
            "or chrome://tracing"
        )


def _emulated_rows(emulated: dict) -> list[tuple[str, str]]:
    memory = emulated["memory"]
    rate = f"{emulated['samples_per_s']:.4g} samples/s"
    if emulated["tokens_per_s"] != emulated["samples_per_s"]:
        rate += f" ({emulated['tokens_per_s']:.4g} tokens/s)"
    fit = "fits" if memory["activations_fit"] and memory["model_state_fits"] else "DOES NOT FIT"
    node = emulated["node"]
    where = memory["activation_memory"]
    rows = [
        (
            f"emulated step ({emulated['hardware']})",
            f"{format_seconds(emulated['step_time_s'])}, {emulated['bound']}-bound, "
            f"{100 * emulated['compute_utilization']:.2g}% of peak",
        ),
        ("emulated node", node),
    ]
    parts = emulated["node_time_by_part_s"]
    if parts.keys() - {"compute"}:
        rows.append(
            (
                "node busy time / step",
                ", ".join(f"{part} {format_seconds(t)}" for part, t in parts.items()),
            )
        )
    return rows + [
        *_group_rows(emulated.get("groups")),
        ("emulated throughput", rate),
        ("emulated energy / step", format_energy(emulated["energy_j"])),
        (
            "emulated memory fit",
            f"{fit}: activations {human_bytes(memory['activation_bytes_per_node'])} / "
            f"{human_bytes(memory['activation_budget_bytes'])} {where}, state "
            f"{human_bytes(memory['model_state_bytes'])} / "
            f"{human_bytes(memory['memoryx_capacity_bytes'])} MemoryX",
        ),
    ]


def _group_rows(groups: list[dict] | None) -> list[tuple[str, str]]:
    """One row per node group: its share, its own time and what it waits for the slowest."""
    return [
        (
            f"group {i}: {g['num_nodes']} x {g['kind']} ({g['hardware']})",
            f"{g['batch_share']} samples, {format_seconds(g['node_time_s'])}, idle "
            f"{format_seconds(g['idle_s'])}, {format_energy(g['energy_j'])}",
        )
        for i, g in enumerate(groups or [])
    ]


def _cluster_text(cfg: dict) -> str:
    groups = cfg.get("node_groups")
    if groups:
        kinds = " + ".join(f"{g['num_nodes']} x {g['backend']['kind']}" for g in groups)
        return f"{kinds} nodes ({cfg['balance']} shares), SwarmX fan-out {cfg['swarmx']['fanout']}"
    return f"{cfg['num_nodes']} x {cfg['backend']['kind']} nodes, SwarmX fan-out {cfg['swarmx']['fanout']}"


def _sparsity_rows(sparsity: dict | None) -> list[tuple[str, str]]:
    if sparsity is None:
        return []
    return [
        ("weight density", f"{100 * sparsity['density']:.1f}% of weights kept"),
        (
            "weights / pass, sparse vs dense",
            f"{human_bytes(sparsity['weight_bytes_per_pass'])} vs "
            f"{human_bytes(sparsity['dense_weight_bytes_per_pass'])}",
        ),
        (
            "emulated step, sparse vs dense",
            f"{format_seconds(sparsity['emulated_step_time_s'])} vs "
            f"{format_seconds(sparsity['dense_emulated_step_time_s'])} "
            f"({sparsity['emulated_speedup']:.2f}x)",
        ),
    ]


def _bytes(value: int | None) -> str:
    return human_bytes(value) if value is not None else "-"


def _stop_rows(result: dict) -> list[tuple[str, str]]:
    rows = []
    if result["num_skipped_steps"]:
        rows.append(("skipped steps (NaN/Inf)", str(result["num_skipped_steps"])))
    stopped = result["stopped"]
    if stopped is not None:
        rows.append(("STOPPED", f"{stopped['reason']} after {stopped['num_steps_done']} steps"))
    return rows


def summary(result: dict) -> str:
    cfg = result["config"]
    traffic = result["traffic"]
    ev = result["eval"] or {}
    rows = [
        (
            "model",
            f"{result['model']['name']} ({result['model']['num_params']:,} params, {result['model']['num_layers']} layers)",
        ),
        ("cluster", _cluster_text(cfg)),
        ("steps", f"{len(result['steps'])} x global batch {cfg['batch_size']}"),
        *_stop_rows(result),
        (
            "final train loss",
            f"{result['final_loss']:.4f}" if result["final_loss"] is not None else "-",
        ),
        ("eval loss", f"{ev['loss']:.4f}" if ev else "-"),
        (
            "eval accuracy",
            f"{100 * ev['accuracy']:.2f}%" if ev.get("accuracy") is not None else "-",
        ),
        ("MemoryX egress / step", _bytes(traffic["memoryx_egress_bytes"])),
        ("MemoryX ingress / step", _bytes(traffic["memoryx_ingress_bytes"])),
        ("delivered to nodes / step", _bytes(traffic["bytes_delivered_to_nodes"])),
        (
            "wall time",
            f"{result['wall_time_s']:.1f} s"
            + (
                f" ({1000 * result['step_wall_time_s']:.1f} ms/step)"
                if result["step_wall_time_s"] is not None
                else ""
            ),
        ),
        *runtime_rows(result.get("runtime")),
        *(_emulated_rows(result["emulated"]) if result["emulated"] is not None else []),
        *_sparsity_rows(result.get("sparsity")),
    ]
    return format_table(["", ""], rows, title="wafer train: summary", align="ll")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="wafer", description="Emulator of a wafer-scale weight-streaming training cluster."
    )
    subparsers = parser.add_subparsers(dest="command", required=True)
    _add_train_parser(subparsers)
    add_simulate_parser(subparsers)
    add_validate_parser(subparsers)
    add_eval_parser(subparsers)
    add_compare_parser(subparsers)
    add_scale_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    # As under `python -m`, a user's module:factory (model or data) may sit in the working
    # directory; the console script alone would not look there.
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    args.argv = argv  # to print the command that resumes a stopped run
    try:
        return args.func(args)
    except ValueError as exc:
        print(f"wafer {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # before a run started (or another command): nothing to save
        print(f"wafer {args.command}: interrupted.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
