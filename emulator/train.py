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

from torch import nn

from core.precision import wire_precision
from emulator.config import ClusterConfig
from emulator.coordinator import Coordinator
from emulator.emulated import check_fits, emulate, measured_workload
from emulator.faults import CheckpointDir, Rewind, RunFailed, checkpoint_step, newest_checkpoint
from emulator.groups import emulate_groups, stream_dtype
from emulator.launch import Cluster, launch
from emulator.memory import RuntimeWatch
from emulator.preflight import check_before_launch
from emulator.prepare import (
    batch_shares,
    check_memoryx,
    check_sparsity,
    layer_shapes,
    prepare_streamed_layers,
)
from emulator.progress import StepProgress
from emulator.report import TrainReport, partial_report, sparsity_report
from emulator.steps import EvalRecord, NonFiniteError
from emulator.stopping import ERROR_EXIT_STATUS, RunStopped, StopSignals
from memoryx.checkpoint import MANIFEST_NAME, checkpoint_dir_name, checkpoint_name
from proto.clients import RpcError


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
