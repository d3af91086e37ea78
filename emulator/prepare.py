"""The run's model before launch: its streamed layers and initial weights, their shapes
and batch shares, and the checks that need the model (sparsity, MemoryX room).

Everything here runs in the driver before any actor starts, so that a model that cannot
run costs a one-paragraph error, not a started cluster.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from core.cost.profile import block_matmuls, block_optical_passes, profile_modules, shape_forward
from emulator.config import ClusterConfig
from emulator.emulated import LayerShape
from emulator.groups import check_mixable, group_shares, node_spans
from emulator.preflight import check_batch, check_checkpoint_room
from emulator.weights import LayerWeights
from emulator.zoo import check_blocks, group_layers, model_blocks, model_positions
from memoryx.layer_files import layer_state_bytes
from nodes.backend import Backend, keeps_layers


def _checked_blocks(
    config: ClusterConfig, module: nn.Module | list[nn.Module], dataset, example: torch.Tensor
) -> list[nn.Module]:
    """``module``'s blocks, checked to chain on ``example`` into outputs the data set can
    score, and the batch against the data set: data that the model cannot score fails
    here, not inside a node's loss."""
    blocks = model_blocks(module)
    dataset.check_positions(model_positions(module))
    output = check_blocks(blocks, example)
    dataset.check_outputs(tuple(output.shape))
    check_batch(config, dataset.num_train)
    return blocks


def prepare_layers(
    config: ClusterConfig, model: nn.Module | None = None, backend: Backend | None = None
) -> tuple[list[nn.Module], object]:
    """The model as streamed layers, checked to chain on the data set's inputs.

    ``backend``: the run's backend, if the caller built it already (else one is built).
    """
    dataset = config.data_config.build(seed=config.seed)
    module = model if model is not None else config.model.build(seed=config.seed)
    blocks = _checked_blocks(config, module, dataset, dataset.input_example())
    backend = backend if backend is not None else config.backend.build()
    if len(config.groups) > 1:
        # Node groups must agree on the layers their backends train, or the run stops here.
        return check_mixable(config, group_layers(blocks))[0], dataset
    # A backend may re-parameterize the layers (photonic: Linear weights -> mesh phases).
    return backend.prepare_layers(group_layers(blocks)), dataset


def prepare_streamed_layers(
    config: ClusterConfig, model: nn.Module | None = None, backend: Backend | None = None
) -> tuple[list[nn.Module], object, LayerWeights]:
    """``prepare_layers`` for a run: the layers, the data set and their initial weights.

    A zoo model that the backend trains as it is (one node group, whose backend keeps
    the layers: ``nodes.backend.keeps_layers``) is built on the meta device: the layers hold shapes only, and ``LayerWeights`` makes
    each layer's weights when it streams to MemoryX, bitwise those of ``config.model.build``
    (emulator.zoo.deferred). So the driver never holds the whole model. Any other model
    (a user's, one a backend re-parameterizes) is built whole, as ``prepare_layers`` does.
    """
    backend = backend if backend is not None else config.backend.build()
    deferred = None
    if model is None and len(config.groups) == 1 and keeps_layers(backend):
        deferred = config.model.build_deferred(seed=config.seed)
    if deferred is None:
        layers, dataset = prepare_layers(config, model, backend)
        return layers, dataset, LayerWeights(layers)
    module, init = deferred
    dataset = config.data_config.build(seed=config.seed)
    # On meta tensors: shapes are checked, nothing is computed.
    blocks = _checked_blocks(config, module, dataset, dataset.input_example().to("meta"))
    layers = group_layers(blocks)
    for layer in layers:  # nodes get the structure with its (small) buffers, no weights
        init.materialize_buffers(layer)
    return layers, dataset, LayerWeights(layers, init)


def sparsity_named_shapes(layers: list[nn.Module]) -> dict[str, tuple[int, ...]]:
    """Parameter shapes under the names a sparsity config sees: ``"{layer}.{name}"``."""
    return {
        f"{index}.{name}": tuple(p.shape)
        for index, layer in enumerate(layers)
        for name, p in layer.named_parameters()
    }


def check_sparsity(config: ClusterConfig, layers: list[nn.Module]) -> None:
    """ValueError before the cluster starts if the sparsity config does not fit the model."""
    if config.sparsity is None:
        return
    try:
        config.sparsity.build(sparsity_named_shapes(layers))
    except ValueError as exc:  # e.g. a param_filter that matches nothing (it lists the names)
        raise ValueError(f"sparsity: {exc}") from None


def check_memoryx(config: ClusterConfig, layers: list[nn.Module]) -> None:
    """ValueError before the cluster starts if MemoryX cannot hold this model as configured,
    or if its state would not fit where the run writes checkpoints (a full disk)."""
    resume_file = config.resume is not None and Path(config.resume).is_file()
    if resume_file and config.memoryx.directory_checkpoints:
        raise ValueError(
            f"resume = {config.resume!r} is a single-file checkpoint of one MemoryX server "
            f"with the state in RAM, but memoryx sets num_servers = "
            f"{config.memoryx.num_servers} and ram_budget_bytes = "
            f"{config.memoryx.ram_budget_bytes}; resume it without the memoryx settings, "
            "and save a directory checkpoint from that run to resume with them."
        )
    masked = (
        ()
        if config.sparsity is None
        else config.sparsity.build(sparsity_named_shapes(layers)).params
    )
    shapes = [{n: tuple(p.shape) for n, p in layer.named_parameters()} for layer in layers]
    config.memoryx.check(shapes, config.optimizer, masked)
    optimizer = config.optimizer.build()
    state_bytes = sum(
        sum(layer_state_bytes(s, optimizer, [n for n in s if f"{i}.{n}" in masked]))
        for i, s in enumerate(shapes)
    )
    check_checkpoint_room(config, state_bytes)


def layer_shapes(layers: list[nn.Module], example: torch.Tensor) -> list[LayerShape]:
    """Parameters and kept input size of each layer, from a forward pass on ``example``."""
    num_examples = example.shape[0]
    shapes = []
    # Layers built on the meta device (prepare_streamed_layers) run on a meta example.
    on_meta = any(p.device.type == "meta" for layer in layers for p in layer.parameters())
    x = example.to("meta") if on_meta else example
    for layer in layers:
        shapes.append(
            LayerShape(
                num_params=sum(p.numel() for p in layer.parameters() if p.requires_grad),
                input_elements_per_sample=x.numel() / num_examples,
                matmuls=block_matmuls(layer, x),
                optical_passes=block_optical_passes(layer),
            )
        )
        with torch.random.fork_rng(devices=[]):
            x = shape_forward(layer, x)
    return shapes


def batch_shares(
    config: ClusterConfig,
    layers: list[nn.Module],
    dataset,
    *,
    samples_per_step: int,
    tokens_per_sample: int,
    precision,
) -> tuple[list[int], list[tuple[int, int]] | None]:
    """Each group's samples per step, and each node's span of the batch (None: equal shards).

    ``balance: throughput`` weighs the groups by their emulated speed on the model's
    analytic workload (``wafer simulate``'s profile), before anything runs.
    """
    workload = None
    if config.balance == "throughput" and len(config.groups) > 1:
        workload = profile_modules(
            config.model.name,
            [(f"layer{i}", layer) for i, layer in enumerate(layers)],
            dataset.input_example(),
            samples_per_step=samples_per_step,
            precision=precision,
            tokens_per_sample=tokens_per_sample,
        )
    shares = group_shares(config, workload)
    per_node = config.batch_size // config.num_nodes
    if all(
        share == group.num_nodes * per_node
        for group, share in zip(config.groups, shares, strict=True)
    ):
        return shares, None  # equal shards, exactly as a homogeneous cluster takes them
    return shares, node_spans(config.groups, shares)
