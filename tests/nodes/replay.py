"""One training step of one node, in-process, next to what the node engine predicts for it.

Backend counters are what a cluster node reports; the engine is what the emulated clock
uses. Tests compare the two part by part, so they cannot drift apart silently.
"""

from __future__ import annotations

from torch import nn

from core.cost.engine import OpCost
from core.cost.profile import profile_modules
from emulator.config import ClusterConfig
from emulator.cost.compile import Cluster, compile_step
from emulator.prepare import prepare_layers
from nodes.worker import NodeWorker


def replay(
    config: ClusterConfig, model: nn.Module | None = None
) -> tuple[dict[str, float], list[OpCost]]:
    """(counter deltas of one node's training step, the engine's cost of each operation).

    ``config`` must have one node, so its share is the whole batch.
    """
    assert config.num_nodes == 1
    layers, dataset = prepare_layers(config, model)
    hardware = config.emulated_hardware
    workload = profile_modules(
        config.model.name,
        [(f"layer{i}", layer) for i, layer in enumerate(layers)],
        dataset.input_example(config.batch_size),
        samples_per_step=config.batch_size,
        precision="fp32",
    )
    weights = [
        {name: p.detach().clone() for name, p in layer.named_parameters()} for layer in layers
    ]
    backend = config.backend.build()
    worker = NodeWorker(
        rank=0,
        num_nodes=1,
        layers=layers,
        dataset=dataset,
        batch_size=config.batch_size,
        seed=config.seed,
        backend=backend,
    )
    before = backend.stats()
    for index, params in enumerate(weights):
        worker.forward(index, 0, params)
    for index in reversed(range(len(weights))):
        worker.backward(index, 0, weights[index])
    after = backend.stats()
    deltas = {name: value - before.get(name, 0.0) for name, value in after.items()}

    engine = config.backend.engine(hardware)
    cluster = Cluster.Config(hardware=hardware, num_nodes=1, engine=engine).build()
    compiled = compile_step(workload, cluster)
    assert compiled.num_micro_batches == 1
    return deltas, [engine.op_cost(op, "fp32") for op in compiled.operations]


def summed(costs: list[OpCost], part: str) -> tuple[float, float]:
    """(time, energy) of ``part`` over all operations."""
    return (
        sum(c.time_by_part_s.get(part, 0.0) for c in costs),
        sum(c.energy_by_part_j.get(part, 0.0) for c in costs),
    )
