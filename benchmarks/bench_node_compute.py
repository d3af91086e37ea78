"""A compute node's own compute over plain PyTorch's, with no cluster around the node.

``bench_train.py`` reports a node's compute time inside a running cluster, beside MemoryX,
SwarmX and the driver on the same cores. This script times the same work alone: one
``nodes.worker.NodeWorker`` runs a step's forward and backward passes layer by layer, on
weights copied fresh for each pass as the wire delivers them, and plain torch runs the
forward and backward of the same layers on the same batch (no optimizer on either side:
MemoryX applies it). Rounds alternate the two, so a noisy machine slows both alike.

If the node alone matches torch but not inside the cluster, the difference is what the
processes beside it cost its compute, not the node's code.

    python benchmarks/bench_node_compute.py                      # gpt-10m, batch 8
    python benchmarks/bench_node_compute.py --model mlp-digits --batch-size 32 --steps 50

This is a measurement script, not a test: it asserts nothing about time.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

from core.atomic import write_json_atomic
from core.data import loss_sum, num_targets
from emulator.config import load_config
from emulator.prepare import prepare_layers
from nodes.worker import NodeWorker


def _fresh(weights: list[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
    return [{name: t.clone() for name, t in layer.items()} for layer in weights]


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="gpt-10m", help="zoo model (gpt-10m)")
    parser.add_argument("--batch-size", type=int, default=8, help="the node's batch (8)")
    parser.add_argument("--steps", type=int, default=3, help="steps per side and round (3)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (3)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads, both sides (1)")
    parser.add_argument("--json", type=Path, help="write the rounds here")
    args = parser.parse_args(argv)
    for flag in ("batch_size", "steps", "rounds", "threads"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1")

    torch.set_num_threads(args.threads)
    config = load_config(
        overrides={"model.name": args.model, "num_nodes": 1, "batch_size": args.batch_size}
    )
    layers, dataset = prepare_layers(config)
    weights = [{n: p.detach().clone() for n, p in layer.named_parameters()} for layer in layers]
    model = torch.nn.Sequential(*copy.deepcopy(layers))  # before the node strips its weights
    node = NodeWorker(
        rank=0,
        num_nodes=1,
        layers=layers,
        dataset=dataset,
        batch_size=args.batch_size,
        seed=config.seed,
        backend=config.backend.build(),
    )

    def node_step(step: int) -> float:
        """Compute seconds of one step, as the node counts them in a cluster."""
        seconds = 0.0
        for index, params in enumerate(_fresh(weights)):
            seconds += node.forward(index, step, params).compute_seconds
        backward = _fresh(weights)
        for index in reversed(range(len(weights))):
            seconds += node.backward(index, step, backward[index])[1].compute_seconds
        return seconds

    def torch_step(step: int) -> float:
        index = node.sampler.shard(step, 0, 1)
        x, y = dataset.train_inputs[index], dataset.train_targets[index]
        started = time.perf_counter()
        model.zero_grad(set_to_none=True)
        out = model(x)
        (loss_sum(dataset.task, out, y) / num_targets(dataset.task, y)).backward()
        return time.perf_counter() - started

    # Warm-up: the allocator's pools and torch's kernels.
    node_step(0)
    torch_step(0)
    rows = []
    for round_index in range(args.rounds):
        steps = range(1 + round_index * args.steps, 1 + (round_index + 1) * args.steps)
        node_s = statistics.median(node_step(step) for step in steps)
        torch_s = statistics.median(torch_step(step) for step in steps)
        rows.append({"round": round_index, "node_s": node_s, "torch_s": torch_s})
        print(
            f"round {round_index}: node {1e3 * node_s:.1f} ms, torch {1e3 * torch_s:.1f} ms, "
            f"node / torch {node_s / torch_s:.3f}"
        )
    ratios = [row["node_s"] / row["torch_s"] for row in rows]
    print(
        f"{args.model}, batch {args.batch_size}, {args.threads} thread(s): node / torch, "
        f"median of {len(rows)} rounds: {statistics.median(ratios):.3f}"
    )
    if args.json is not None:
        write_json_atomic(args.json, {"args": {**vars(args), "json": str(args.json)}, "rows": rows})
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
