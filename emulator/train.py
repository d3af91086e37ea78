"""``train``: build the model, launch the cluster, run the steps, report.

This is the Python API behind ``wafer train``:

    from emulator.config import load_config
    from emulator.train import train
    report = train(load_config(overrides={"num_nodes": 4}))

A user's own ``nn.Module`` can be passed as ``model=`` (see the README for
what the emulator accepts).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from core.cost.profile import (
    block_matmuls,
    block_optical_passes,
    profile_modules,
    shape_forward,
)
from core.precision import wire_precision
from emulator.config import ClusterConfig
from emulator.coordinator import (
    Coordinator,
    EvalRecord,
    NonFiniteError,
    group_layers,
)
from emulator.emulated import (
    LayerShape,
    check_fits,
    emulate,
    measured_workload,
)
from emulator.faults import CheckpointDir, Rewind, RunFailed, checkpoint_step, newest_checkpoint
from emulator.groups import (
    check_mixable,
    emulate_groups,
    group_shares,
    node_spans,
    stream_dtype,
)
from emulator.launch import Cluster, launch
from emulator.memory import RuntimeWatch
from emulator.preflight import check_batch, check_before_launch, check_checkpoint_room
from emulator.progress import StepProgress
from emulator.report import TrainReport, partial_report, sparsity_report
from emulator.stopping import ERROR_EXIT_STATUS, RunStopped, StopSignals
from emulator.weights import LayerWeights
from emulator.zoo import check_blocks, model_blocks, model_positions
from memoryx.checkpoint import MANIFEST_NAME, checkpoint_dir_name, checkpoint_name
from memoryx.layer_files import layer_state_bytes
from nodes.backend import Backend, keeps_layers
from proto.clients import RpcError


def prepare_layers(
    config: ClusterConfig, model: nn.Module | None = None, backend: Backend | None = None
) -> tuple[list[nn.Module], object]:
    """The model as streamed layers, checked to chain on the data set's inputs.

    ``backend``: the run's backend, if the caller built it already (else one is built).
    """
    dataset = config.data_config.build(seed=config.seed)
    module = model if model is not None else config.model.build(seed=config.seed)
    blocks = model_blocks(module)
    # Data that the model cannot score fails here, not inside a node's loss.
    dataset.check_positions(model_positions(module))
    output = check_blocks(blocks, dataset.input_example())
    dataset.check_outputs(tuple(output.shape))
    check_batch(config, dataset.num_train)
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
    blocks = model_blocks(module)
    dataset.check_positions(model_positions(module))
    # On meta tensors: shapes are checked, nothing is computed.
    output = check_blocks(blocks, dataset.input_example().to("meta"))
    dataset.check_outputs(tuple(output.shape))
    check_batch(config, dataset.num_train)
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


def resolve_resume(config: ClusterConfig) -> ClusterConfig:
    """``resume: DIR | auto``: the newest checkpoint there, and the steps left to the run's end.

    A checkpoint file stays as it is (``num_steps`` more steps are run from it).
    """
    if config.resume is None:
        return config
    directory = config.checkpoint.dir if config.resume == "auto" else config.resume
    if directory is None:
        raise ValueError(
            "resume = 'auto' needs checkpoint.dir, the directory of the run's periodic checkpoints."
        )
    if not os.path.isdir(directory) or os.path.isfile(os.path.join(directory, MANIFEST_NAME)):
        return config  # a checkpoint file, or one directory checkpoint (tiered or sharded)
    path, final_step = newest_checkpoint(directory)
    num_steps = config.num_steps
    if final_step is not None:
        step = checkpoint_step(path)
        if step is not None and step >= final_step:
            raise ValueError(
                f"resume = {config.resume!r}: the run in {directory} already finished "
                f"(its newest checkpoint {path} is at its final step {final_step})."
            )
        num_steps = final_step - step
    return dataclasses.replace(config, resume=path, num_steps=num_steps)


def train(
    config: ClusterConfig,
    *,
    model: nn.Module | None = None,
    progress: bool = True,
    fault: Callable[[int, int, str], None] | None = None,
    stop: StopSignals | None = None,
    on_launch: Callable[[Cluster], None] | None = None,
    final_weights: bool = True,
) -> TrainReport:
    """Run ``config``; raises ``RunStopped`` with the partial report if the run ends early.

    It ends early on a NaN/Inf update with ``optimizer.nonfinite = error``, on
    KeyboardInterrupt, and when ``stop`` (the CLI's signal handlers) asks: at
    the next step boundary, after which MemoryX's state is saved as a
    checkpoint (``save_checkpoint``, else in ``checkpoint.dir``, else ``wafer-step<N>.ckpt``
    here). A run
    that loses components past ``runtime.max_restarts`` raises ``RunFailed``
    with the partial report and a checkpoint.

    ``final_weights``: read the final fp32 weights back from MemoryX into
    ``report.final_weights`` (all of them, in this process's RAM). False leaves them in
    MemoryX (None in the report): for a model that must not be whole here, and for
    callers that don't use them (``wafer train``: MemoryX writes the checkpoints).

    ``fault`` and ``on_launch`` are test seams: ``fault(step, layer, phase)`` runs
    before each layer pass, ``on_launch(cluster)`` once the actors are up (chaos
    tests take the actors' handles from it).
    """
    started = time.perf_counter()
    config = resolve_resume(config)
    check_before_launch(config)
    CheckpointDir(config.checkpoint).check_writable()
    # Built once: the driver's copy prepares and checks the layers; facts come from its config.
    backend = config.backend.build()
    layers, dataset, initial_weights = prepare_streamed_layers(config, model, backend)
    check_sparsity(config, layers)
    num_params = sum(p.numel() for layer in layers for p in layer.parameters())
    tokens_per_sample = (
        1 if dataset.task == "classification" else int(dataset.train_targets.shape[1])
    )
    # Mixed groups: MemoryX streams fp32 and SwarmX rounds it per node.
    wire_dtype = stream_dtype(config)
    hardware = config.emulated_hardware
    engine = config.backend.engine(hardware)
    shapes = layer_shapes(layers, dataset.input_example())
    workload_args = {
        "samples_per_step": config.batch_size,
        "tokens_per_sample": tokens_per_sample,
        "precision": wire_precision(wire_dtype),
    }
    # Fail before the cluster starts if the emulated hardware cannot run this at all.
    check_fits(
        config.model.name, shapes, hardware, config.num_nodes, engine=engine, **workload_args
    )
    for index, group in enumerate(config.groups):
        group_hw = config.group_hardware(group)
        check_fits(
            config.model.name,
            shapes,
            group_hw,
            group.num_nodes,
            engine=group.backend.engine(group_hw),
            **workload_args,
        )
        (backend if index == 0 else group.backend.build()).check_layers(layers)
    check_memoryx(config, layers)
    num_layers = len(layers)
    shares, spans = batch_shares(config, layers, dataset, **workload_args)
    try:
        cluster = launch(config, layers, dataset, spans=spans)
    except RuntimeError as exc:  # a component did not start, or the tree could not be wired
        raise RunFailed(
            f"the cluster did not start: {exc}.", component="cluster", step=0, cause=str(exc)
        ) from None
    if progress and sys.stderr.isatty():
        # Where an outside client finds the token (0600), the CA and the addresses. Off a
        # terminal stderr holds only progress lines: set runtime.run_dir to know the place.
        print(f"wafer: run directory {cluster.run_dir}", file=sys.stderr)
    if stop is not None:
        stop.install()  # ray.init replaced the SIGTERM handler with its own
    evals: list[EvalRecord] = []
    weights = traffic = densities = None
    coordinator: Coordinator | None = None
    halt: _Halt | None = None
    watch: RuntimeWatch | None = None
    try:
        watch = RuntimeWatch(cluster, started)
        if on_launch is not None:
            on_launch(cluster)
        coordinator = Coordinator(
            config=config,
            cluster=cluster,
            num_layers=num_layers,
            wire_dtype=wire_dtype,
            task=dataset.task,
            tokens_per_sample=tokens_per_sample,
            fault=fault,
        )
        try:
            if config.resume is None:
                coordinator.load_weights(initial_weights)
            # MemoryX holds the weights now; a model beyond RAM must not stay here as well.
            del layers, initial_weights
            first = coordinator.start_step
            coordinator.supervisor.note_spill_dirs()  # removed when their server is lost
            watch.steps_started()
            coordinator.checkpoints.write_run_info(first + config.num_steps, config.seed)

            def after_step() -> None:
                watch.step_done()
                cluster.start_spare()  # not before: its start would slow the first step

            halt, weights = _run_steps(
                config,
                coordinator,
                first,
                evals,
                progress,
                stop,
                after_step,
                final_weights=final_weights,
            )
            if halt is None:
                if config.save_checkpoint:
                    coordinator.save_checkpoint(os.path.abspath(config.save_checkpoint))
            elif halt.checkpoint_wanted and coordinator.steps:
                halt.checkpoint = _save_on_stop(config, coordinator, first)
            traffic = coordinator.traffic()
            densities = coordinator.weight_densities() if config.sparsity is not None else None
        except KeyboardInterrupt:
            # A second signal (or a Ctrl-C with no handler installed): stop now, report what is done.
            halt = _Halt(
                reason=stop.name if stop is not None and stop.requested else "SIGINT",
                message="stopped at once; a step in flight is not in the report",
                exit_status=stop.exit_status if stop is not None else 130,
                at_once=True,
                checkpoint=halt.checkpoint if halt is not None else None,
            )
        except RunFailed as failed:
            failed.partial = partial_report(config, coordinator, evals, failed)
            failed.checkpoint = _last_checkpoint(config, coordinator)
            raise
    finally:
        if stop is not None:
            stop.finishing()  # from here a signal must not cut the report short
        if coordinator is not None:
            coordinator.close()
            coordinator.remove_initial_copy()
        if watch is not None:
            watch.stop()
        # A Ctrl-C here: Cluster.stop kills every actor on its way out; the report still follows.
        with contextlib.suppress(KeyboardInterrupt):
            cluster.stop()
    steps = coordinator.steps if coordinator is not None else []
    emulated = sparsity = grouped = None
    if traffic is not None and coordinator is not None and coordinator.measured:
        # Every step moves the same bytes and computes the same FLOPs: one cost-model run suffices.
        workload = measured_workload(
            config.model.name, shapes, coordinator.measured, densities=densities, **workload_args
        )
        emulated = emulate(
            workload,
            hardware,
            config.num_nodes,
            peak_activation_bytes_per_node=max(
                n["peak_activation_bytes"] for n in traffic["nodes"]
            ),
            engine=engine,
        )
        if config.node_groups:
            peaks = [n["peak_activation_bytes"] for n in traffic["nodes"]]
            group_peaks, start = [], 0
            for group in config.groups:
                group_peaks.append(max(peaks[start : start + group.num_nodes]))
                start += group.num_nodes
            grouped = emulate_groups(
                workload, config, shares, peak_activation_bytes_per_node=group_peaks
            )
            emulated = grouped.slowest.step
        if densities is not None:
            sparsity = sparsity_report(
                workload,
                densities,
                emulated,
                hardware,
                config.num_nodes,
                wire_precision=wire_precision(wire_dtype),
            )
    report = TrainReport(
        sparsity=sparsity,
        config=config,
        num_layers=num_layers,
        num_params=num_params,
        model_bytes=num_params * 4,
        steps=steps,
        evals=evals,
        wall_time_s=time.perf_counter() - started,
        traffic=traffic,
        final_weights=weights,
        final_masks=coordinator.fetched_masks
        if config.sparsity is not None and weights is not None
        else None,
        emulated=emulated,
        grouped=grouped,
        faults=coordinator.supervisor.report() if coordinator is not None else [],
        retries=coordinator.supervisor.retried if coordinator is not None else [],
        runtime=watch.report(steps[0].wall_time_s if steps else None) if watch else {},
    )
    if halt is None:
        return report
    report.stopped = {
        "reason": halt.reason,
        "message": halt.message,
        "num_steps_done": len(steps),
        "checkpoint": halt.checkpoint,
    }
    raise RunStopped(
        f"{halt.reason}: {halt.message.rstrip('.')}; {len(steps)} of {config.num_steps} steps done.",
        report=report,
        exit_status=halt.exit_status,
        checkpoint=halt.checkpoint,
        steps_left=config.num_steps - len(steps),
    )


@dataclass
class _Halt:
    """Why and how a run ended before its last step."""

    reason: str  # SIGINT, SIGTERM or nonfinite
    message: str
    exit_status: int
    at_once: bool = False
    checkpoint_wanted: bool = False
    checkpoint: str | None = None


def _run_steps(
    config: ClusterConfig,
    coordinator: Coordinator,
    first: int,
    evals: list[EvalRecord],
    progress: bool,
    stop: StopSignals | None,
    after_step: Callable[[], None] | None = None,
    *,
    final_weights: bool = True,
) -> tuple[_Halt | None, list | None]:
    """The training steps, the final eval and (``final_weights``) the final weights; or a
    ``_Halt`` at a step boundary. ``after_step`` is called after each training step.

    A MemoryX that came back from a checkpoint (``Rewind``) runs the steps since again.
    """
    final_step = first + config.num_steps
    bar = StepProgress(range(first, final_step), enabled=progress)
    step = first
    try:
        while True:
            try:
                while step < final_step:
                    if stop is not None and stop.requested:
                        return _Halt(
                            reason=stop.name,
                            message=f"stopped at the boundary of step {step}",
                            exit_status=stop.exit_status,
                            checkpoint_wanted=True,
                        ), None
                    try:
                        count = _steps_in_pass(config, coordinator, step, first, final_step)
                        records = coordinator.train_steps(step, count)
                    except NonFiniteError as exc:
                        halt = _Halt(
                            reason="nonfinite", message=str(exc), exit_status=ERROR_EXIT_STATUS
                        )
                        return halt, None
                    for record in records:
                        if after_step is not None:
                            after_step()
                        coordinator.periodic_checkpoint(step, first)
                        if _eval_due(config, step, first) and step + 1 < final_step:
                            evals.append(coordinator.evaluate(step + 1))
                        bar.advance(1)
                        bar.set_loss(record.loss)
                        step += 1
                evals.append(coordinator.evaluate(final_step))
                return None, coordinator.fetch_weights(final_step) if final_weights else None
            except Rewind as rewind:
                # MemoryX came back from a checkpoint: the steps since are run again.
                coordinator.rewind(rewind.step)
                evals[:] = [e for e in evals if e.step <= rewind.step]
                bar.advance(rewind.step - step)
                step = rewind.step
    finally:
        bar.close()


def _eval_due(config: ClusterConfig, step_done: int, first: int) -> bool:
    """Whether an evaluation follows training step ``step_done`` (``eval_every``)."""
    return bool(config.eval_every) and (step_done + 1 - first) % config.eval_every == 0


def _steps_in_pass(
    config: ClusterConfig, coordinator: Coordinator, step: int, first: int, final_step: int
) -> int:
    """How many training steps from ``step`` go in one pass: up to the coordinator's
    ``steps_per_pass``, the run's first step alone (the warm spare starts after it), and
    none past a step after which the driver has work (an evaluation, a checkpoint)."""
    if step == first:
        return 1
    count = 1
    while count < coordinator.steps_per_pass and step + count < final_step:
        done = step + count - 1  # the pass would go on after this step
        if coordinator.checkpoints.due(done, first) or _eval_due(config, done, first):
            break
        count += 1
    return count


def _save_on_stop(config: ClusterConfig, coordinator: Coordinator, first: int) -> str | None:
    """MemoryX's committed state after the last step done, or None if it cannot be written.

    It goes to ``save_checkpoint`` if set, else into ``checkpoint.dir`` beside the periodic
    checkpoints (where ``--resume auto`` looks), else to ``wafer-step<N>.ckpt`` here.
    """
    step = first + len(coordinator.steps)
    try:
        if config.save_checkpoint is None and config.checkpoint.dir is not None:
            return coordinator.checkpoint_to_dir()
        path = os.path.abspath(config.save_checkpoint or f"wafer-step{step}.ckpt")
        coordinator.save_checkpoint(path)
    except (RpcError, OSError):  # MemoryX could not save, or the copy out of the run failed
        return None
    return path


def _last_checkpoint(config: ClusterConfig, coordinator: Coordinator) -> str | None:
    """A checkpoint of the committed state, where the run keeps them; else the newest one.

    MemoryX may be the component that failed, so this tries once and falls back to
    the newest periodic checkpoint.
    """
    target = None
    if config.checkpoint.dir is not None:
        version = coordinator.steps[-1].step + 1 if coordinator.steps else None
        if version is not None:
            # Named as MemoryX names it: a directory for tiered or sharded MemoryX.
            name = (
                checkpoint_dir_name(version)
                if config.memoryx.directory_checkpoints
                else checkpoint_name(version)
            )
            target = os.path.join(os.path.abspath(config.checkpoint.dir), name)
    elif config.save_checkpoint:
        target = os.path.abspath(config.save_checkpoint)
    if target is not None:
        try:
            coordinator.save_checkpoint(target)
            return target
        except Exception:  # noqa: BLE001 - MemoryX may be the component that is gone
            pass
    return coordinator.supervisor.latest_export
