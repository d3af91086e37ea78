"""``wafer simulate --node-groups``: a heterogeneous cluster's step on the analytic cost model."""

from __future__ import annotations

import argparse

from core.atomic import write_json_atomic
from core.cost.workload import Workload
from core.units import format_energy, format_seconds
from emulator.config import ClusterConfig, load_config
from emulator.groups import GroupedStep, emulate_groups, group_shares
from emulator.table import format_table


def grouped_config(
    config_path: str | None,
    node_groups: str,
    balance: str | None,
    batch_size: int,
    hardware: dict | None = None,
) -> ClusterConfig:
    """The cluster config of a node-groups prediction (``--config``'s file, then the flags)."""
    overrides: dict = {"node_groups": node_groups, "batch_size": batch_size}
    if balance is not None:
        overrides["balance"] = balance
    for dotted, value in (hardware or {}).items():
        overrides[f"hardware.{dotted}"] = value
    return load_config(config_path, overrides)


def swarmx_power_w(config: ClusterConfig) -> float:
    """The whole SwarmX tree of the cluster (all groups' nodes), W."""
    swarmx = config.emulated_hardware.build().swarmx
    return sum(swarmx.nodes_per_level(config.num_nodes)) * swarmx.config.power_w_per_node


def simulate_groups(workload: Workload, config: ClusterConfig) -> GroupedStep:
    """Each group's predicted step on its share of ``workload``'s batch."""
    shares = group_shares(config, workload)
    return emulate_groups(
        workload, config, shares, peak_activation_bytes_per_node=[0.0] * len(shares)
    )


def groups_table(grouped: GroupedStep, config: ClusterConfig, title: str) -> str:
    data = grouped.to_json(swarmx_power_w=swarmx_power_w(config))
    rows = [
        [
            f"{i}: {g['num_nodes']} x {g['kind']}",
            g["hardware"],
            str(g["batch_share"]),
            format_seconds(g["node_time_s"]),
            format_seconds(g["idle_s"]),
            format_energy(g["energy_j"]),
        ]
        for i, g in enumerate(data["groups"])
    ]
    rows.append(
        [
            f"cluster ({config.balance})",
            "",
            str(config.batch_size),
            format_seconds(data["step_time_s"]),
            "",
            format_energy(data["energy_j"]),
        ]
    )
    headers = ["group", "hardware", "samples", "node time", "idle", "energy / step"]
    return format_table(headers, rows, title=title)


def run_simulate_groups(args: argparse.Namespace, workload: Workload, hardware: dict) -> int:
    config = grouped_config(
        args.config, args.node_groups, args.balance, workload.samples_per_step, hardware
    )
    grouped = simulate_groups(workload, config)
    title = (
        f"{workload.name}: batch {workload.samples_per_step} on node groups {args.node_groups}, "
        "each group on its own engine; the step waits for the slowest"
    )
    print(groups_table(grouped, config, title))
    if args.json:
        write_json_atomic(
            args.json,
            {
                "model": workload.name,
                "samples_per_step": workload.samples_per_step,
                "precision": workload.precision,
                "balance": config.balance,
                **grouped.to_json(swarmx_power_w=swarmx_power_w(config)),
            },
        )
        print(f"wrote {args.json}")
    if args.trace:
        from emulator.cost.trace import write_trace

        write_trace(grouped.events(), args.trace)
        print(f"wrote {args.trace}; open it in https://ui.perfetto.dev or chrome://tracing")
    return 0


__all__ = ["grouped_config", "groups_table", "run_simulate_groups", "simulate_groups"]
