"""The step coordinator: drives weight-streamed training over gRPC.

One step k:
  forward   for each layer l = 0..L-1: the root SwarmX pulls layer l (version
            k) from MemoryX and broadcasts it; every node computes its shard.
  backward  for each layer l = L-1..0: the weights stream in again; every
            node computes its gradients and sends them up; SwarmX sums them;
            MemoryX applies the update for layer l as soon as it arrives.
  commit    MemoryX drops its snapshots of version k (when the next pass asks
            for its first layer, or before anything else reads MemoryX).
Up to ``runtime.steps_per_pass`` steps go as one pass: MemoryX sends step
k + 1's layer l once it has applied and answered step k's update of it, so no
round trip through the driver separates the steps.
A pass that fails part-way is run again from its first step's forward pass:
MemoryX serves each step's weights from the snapshots it keeps until the commit
and ignores gradients it has already applied. Before the re-run, lost
components are replaced (emulator.faults).
"""

from __future__ import annotations

import itertools
import secrets
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch

from emulator.config import ClusterConfig
from emulator.emulated import PassMeasurement
from emulator.faults import (
    CheckpointDir,
    ComponentLost,
    RunFailed,
    StateUnread,
    Supervisor,
    deadlines,
)
from emulator.launch import Cluster
from emulator.shards import MemoryXServers
from emulator.steps import (
    PASS_NAMES,
    EvalRecord,
    NonFiniteError,
    StepFault,
    StepRecord,
    auto_steps_per_pass,
    completed_steps,
    describe,
    in_pass_order,
    measurement,
    training_order,
)
from emulator.traffic import cluster_traffic
from emulator.weights import INITIAL_DIR, InitialCopy, LayerWeights
from memoryx.checkpoint import confined_path, write_manifest
from proto.clients import PendingPass, RpcError, SwarmXClient, wire_bytes
from proto.domain import CheckpointInfo, LayerAck, LayerRequest, Phase, TrafficStats
from proto.rpc import NONFINITE_STATUS
from swarmx.pass_run import MAX_IN_FLIGHT

#: Layers of a pass in flight at once: the one the nodes compute and the next one streaming.
#: A pass is one ``RunPass`` call to the root, which sends its layers to each compute node
#: on one ``DeliverPass`` stream and takes them from MemoryX on one ``StreamPass`` call per
#: server (the per-call cost dominates small layers).
PASS_WINDOW = MAX_IN_FLIGHT


@dataclass
class Coordinator:
    config: ClusterConfig
    cluster: Cluster
    num_layers: int
    wire_dtype: str
    task: str
    tokens_per_sample: int
    #: Test seam: called before each layer phase; raising simulates a failure there.
    fault: Callable[[int, int, str], None] | None = None
    steps: list[StepRecord] = field(default_factory=list)
    #: Per layer and pass, what the last training step moved and computed (see emulator.emulated).
    measured: list[PassMeasurement] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.deadlines = deadlines(self.config.runtime)
        # Ids of pipelined passes: unique per attempt, and not those of an earlier driver.
        self._pass_ids = itertools.count(secrets.randbits(48) + 1)
        self.root: SwarmXClient | None = None
        self._connect_clients()
        # A backend whose backward needs no weights (DFA) gets a header-only backward stream.
        self.backward_weights = self.config.backend.needs_weights_in_backward
        self._layer_timeouts_s: list[float] | None = None
        self._auto_steps_per_pass: int | None = None
        self._initial: tuple[InitialCopy, int] | None = None
        # The last step run, when MemoryX is yet to commit it: the next training pass's
        # requests say so (``commit_before``), anything else commits it first.
        self._uncommitted: int | None = None
        self.checkpoints = CheckpointDir(self.config.checkpoint)
        self.supervisor = Supervisor(
            cluster=self.cluster,
            runtime=self.config.runtime,
            checkpoints=self.checkpoints,
            reload_weights=self._reload_weights,
            batch_size=self.config.batch_size,
            spill_root=self.config.memoryx.spill_dir,
        )

    def _connect_clients(self) -> None:
        """Clients of MemoryX and the root at their current addresses (they change on restart)."""
        self.close()
        security = self.cluster.security
        self.memoryx = MemoryXServers(
            self.cluster.memoryx_addresses,
            self.cluster.memoryx_shards or self.cluster.memoryx_layers,
            security,
            self.deadlines,
        )
        self.root = SwarmXClient(self.cluster.root_address, security, self.deadlines)
        # One RunPass stream carries pass after pass (a root that joins layers split over
        # MemoryX servers, on threads, reads one pass per call).
        self._keep_pass_stream = not self.cluster.memoryx_split
        self._traffic_at_step_end = None  # another MemoryX, or the same one restarted
        # Layer deadlines scale with the node count, which shrinks with on_node_loss: shrink.
        self._layer_timeouts_s = None

    def load_weights(self, weights: LayerWeights, step: int = 0) -> None:
        """Stream the initial weights to MemoryX one layer at a time, keeping them on disk.

        A MemoryX lost before the first checkpoint restarts from the copy in the run
        directory (``InitialCopy``); the driver keeps none of it in RAM.
        """
        self._initial = (InitialCopy(self.cluster.run_dir / INITIAL_DIR, weights), step)
        try:
            self._send_weights()
        finally:
            self._initial[0].release()

    def _send_weights(self) -> None:
        self._traffic_at_step_end = None  # (moves MemoryX's counters)
        self._uncommitted = None  # a new MemoryX: nothing of this one's to commit
        assert self._initial is not None
        copy, step = self._initial
        self.memoryx.load_weights(
            copy,
            layer_bytes=[copy.layer_bytes(i) for i in range(len(copy))],
            step=step,
            chunk_bytes=self.config.swarmx.chunk_bytes,
            sender="driver",
        )

    def _reload_weights(self) -> None:
        self._connect_clients()
        if self._initial is None:
            raise RuntimeError("the new MemoryX has no weights and the run has none to give it")
        self._send_weights()

    def close(self) -> None:
        """End the root's ``RunPass`` stream kept for the next pass (the run is over, or the
        root is replaced)."""
        if self.root is not None:
            self.root.close()

    def remove_initial_copy(self) -> None:
        """The run ended (or a checkpoint now covers restarts): its initial copy goes."""
        if self._initial is not None:
            self._initial[0].remove()
            self._initial = None

    @property
    def start_step(self) -> int:
        return self.memoryx.layout().step

    def _layer_timeout_s(self, layer: int) -> float:
        """Deadline of a pass of ``layer``: its fixed part plus the bytes broadcast to every node."""
        if self._layer_timeouts_s is None:
            num_nodes = len(self.cluster.node_addresses)
            self._layer_timeouts_s = [
                self.deadlines.for_layer(num_nodes * wire_bytes(spec.spec, self.wire_dtype))
                for spec in self.memoryx.layout().layers
            ]
        return self._layer_timeouts_s[layer]

    def _run_pass(
        self,
        order: Iterable[tuple[int, int, Phase]],
        *,
        commit_before: int = 0,
        answered: list[tuple[LayerAck, float]] | None = None,
    ) -> list[LayerAck]:
        """The layer phases of one pass, in ``order`` (step, layer, phase), with up to
        ``PASS_WINDOW`` in flight; ``answered`` gets each answer with the time it came, as
        it comes (what a pass that fails brought before it failed).

        One ``RunPass`` call to the root carries the pass: a layer's request goes on it
        once the window has room, and each layer's answer comes back on it in order. The
        root fetches and broadcasts the next layer while the nodes compute this one
        (across the turn from forward to backward too); each node computes them in pass
        order (``LayerHeader.pass_id``), and each layer keeps its own answer, version and
        (backward) update. A failure cancels the call and with it the layers still in
        flight; the step is then run again, as a pass with a new id.
        """
        pass_id = next(self._pass_ids)
        order = list(order)
        # A disk-tiered MemoryX budgets RAM for one layer's update at a time (memoryx.tiers):
        # its layers go one by one.
        window = 1 if self.config.memoryx.ram_budget_bytes is not None else PASS_WINDOW
        # The root runs at most PASS_WINDOW layers at a time and reads the next request (and
        # asks MemoryX for its weights) meanwhile, so requests go at once, without a round
        # trip through the driver per layer; unless a layer must wait for the one before it
        # (window 1), or the fault seam is to run before each layer phase as it starts.
        ahead = window if window < PASS_WINDOW or self.fault is not None else len(order)
        # The pass's deadline: its layers' deadlines, one after the other.
        timeout_s = sum(self._layer_timeout_s(layer) for _, layer, _ in order)
        pending = self.root.start_pass(timeout_s=timeout_s, keep=self._keep_pass_stream)
        requests = [
            LayerRequest(
                layer=layer,
                step=step,
                phase=phase,
                dtype=self.wire_dtype,
                without_weights=phase == Phase.BACKWARD and not self.backward_weights,
                pass_id=pass_id,
                pass_position=position,
                pass_length=len(order),
                commit_before=commit_before,
                # A later step's layers may be asked for before the updates they follow.
                after_update=step > order[0][0],
            )
            for position, (step, layer, phase) in enumerate(order, start=1)
        ]
        answered = [] if answered is None else answered
        try:
            if ahead >= len(order):
                pending.send_all(requests)  # in one message (a message costs more than a request)
            else:
                for request in requests:
                    if request.pass_position - 1 - len(answered) == ahead:
                        answered.append(self._watched(pending))
                    if self.fault is not None and request.phase in PASS_NAMES:  # training only
                        self.fault(request.step, request.layer, PASS_NAMES[request.phase])
                    pending.send(request)
            pending.close()
            while len(answered) < len(order):
                answered.append(self._watched(pending))
        except BaseException:
            pending.cancel()  # after a failure: nothing is left running
            raise
        return in_pass_order(requests, [ack for ack, _ in answered])

    def _watched(self, pending: PendingPass) -> tuple[LayerAck, float]:
        """Wait for a pass's next answer; while it is under way, probe every component's health.

        A layer that takes longer than ``runtime.health_interval_s`` triggers a probe;
        a component that does not answer within ``runtime.health_timeout_s`` ends the
        pass (``ComponentLost``), so a hung node costs seconds, not the pass's deadline.
        Returns the answer and the time it came.
        """
        while True:
            try:
                ack = pending.next_ack(timeout_s=self.config.runtime.health_interval_s)
                return ack, time.perf_counter()
            except TimeoutError:
                problems = self.supervisor.probe()
                if problems:
                    pending.cancel()
                    raise ComponentLost(problems) from None

    @property
    def steps_per_pass(self) -> int:
        """Training steps one pass may carry (``runtime.steps_per_pass``); one where a step's
        end needs the driver: a disk-tiered MemoryX (its layers go one by one), layers split
        over MemoryX servers (committed at each step's end), nodes whose state is read
        after each step (``Supervisor.collect_pass_states``). ``auto``:
        ``emulator.steps.auto_steps_per_pass``."""
        if (
            self.config.memoryx.ram_budget_bytes is not None
            or self.cluster.memoryx_split
            or self.supervisor.keeps_node_states()
        ):
            return 1
        chosen = self.config.runtime.steps_per_pass
        if chosen != "auto":
            return chosen
        if self._auto_steps_per_pass is None:
            weight_bytes = sum(
                wire_bytes(spec.spec, "float32") for spec in self.memoryx.layout().layers
            )
            self._auto_steps_per_pass = auto_steps_per_pass(
                len(self.cluster.node_addresses), weight_bytes
            )
        return self._auto_steps_per_pass

    def _commit_ended(self) -> None:
        """MemoryX commits the last step run, if the next training pass was to say so:
        before anything else reads or saves its state (an evaluation, weights, a checkpoint,
        its counters)."""
        self._traffic_at_step_end = None  # (moves MemoryX's counters)
        if self._uncommitted is not None:
            self.memoryx.commit_step(self._uncommitted)
            self._uncommitted = None

    def _recovering(
        self,
        step: int,
        run: Callable[[], object],
        failed_step: Callable[[], int] | None = None,
    ) -> tuple[object, int]:
        """``run()`` until it succeeds, replacing lost components in between.

        A failure after which every component answers is transient and counts
        against ``runtime.max_step_retries`` (per step: ``failed_step()`` says which one
        a failure stopped at, where a run does several); replacements count against
        ``runtime.max_restarts`` (``Supervisor.recover``). Returns the result and
        the number of attempts.
        """
        retries = 0
        attempt = 0
        while True:
            attempt += 1
            try:
                return run(), attempt
            except (RpcError, StepFault, ComponentLost, StateUnread) as exc:
                if isinstance(exc, RpcError) and exc.code() == NONFINITE_STATUS:
                    raise NonFiniteError(exc.details()) from None  # a re-run computes the same
                if failed_step is not None and failed_step() != step:
                    step, retries = failed_step(), 0  # the steps before it are done
                self.last_error = exc
                try:
                    replaced = self.supervisor.recover(step, exc)
                finally:
                    # Replacements have new addresses (also when MemoryX rewinds the run).
                    self._connect_clients()
                if replaced:
                    continue
                self.supervisor.retried.append({"step": step, "error": describe(exc)})
                retries += 1
                if retries > self.config.runtime.max_step_retries:
                    raise RunFailed(
                        f"step {step} failed {retries} times although every component answers "
                        f"its health check; the last error: {describe(exc)}. Raise "
                        "runtime.max_step_retries if the failures are transient.",
                        component="cluster",
                        step=step,
                        cause=describe(exc),
                    ) from exc

    def train_step(self, step: int) -> StepRecord:
        return self.train_steps(step, 1)[0]

    def train_steps(self, first: int, count: int) -> list[StepRecord]:
        """Training steps ``first`` .. ``first + count - 1`` as one pass (``emulator.steps.training_order``),
        at most ``steps_per_pass`` of them.

        A pass that fails keeps the steps it completed (their answers all came: recorded,
        and committed by the next pass), and the steps from the one that failed run again,
        as a pass of their own; MemoryX ignores the updates it already applied."""
        if not 1 <= count <= self.steps_per_pass:
            raise ValueError(f"count = {count} must be 1..{self.steps_per_pass} steps per pass")
        for step in range(first, first + count):
            self.supervisor.keep_states_at(step)
        end = first + count
        records: list[StepRecord] = []
        failures = 0  # since the last step completed: its attempts, less one
        last_end_s = time.perf_counter()

        def record(start: int, answered: list, before: TrafficStats) -> None:
            """Records of the steps from ``start`` that ``answered`` completes."""
            nonlocal last_end_s, failures
            for acks, ended_s in completed_steps(start, self.num_layers, answered):
                step = first + len(records)
                # MemoryX's counters at the step's end came with its backward answers; a
                # step whose answers lack a server's (a layer split over servers: one step
                # per pass) commits now, and they come with that.
                after = self.memoryx.counters_in(acks)
                if after is None:
                    after = self.memoryx.commit_step(step)
                    self._uncommitted = None  # (every step up to this one is committed now)
                else:
                    self._uncommitted = step
                records.append(
                    StepRecord.from_answers(
                        step,
                        acks,
                        before,
                        after,
                        wall_time_s=ended_s - last_end_s,
                        attempts=failures + 1,
                        classifier=self._is_classifier,
                    )
                )
                self.steps.append(records[-1])
                self.supervisor.step_done(step)
                self.measured = [measurement(a) for a in acks]
                self._traffic_at_step_end = before = after
                last_end_s, failures = ended_s, 0

        def one_attempt() -> None:
            nonlocal failures
            start = first + len(records)
            # MemoryX traffic from its counters at the end of the step before, where nothing
            # has used MemoryX since (a step right after another), else read now.
            before = self._traffic_at_step_end or self.memoryx.stats()
            self._traffic_at_step_end = None  # a second attempt reads them again
            answered: list[tuple[LayerAck, float]] = []
            try:
                # Every step before ``start`` has ended: MemoryX commits them as the pass
                # asks for its first layer, instead of in a CommitStep round trip. The
                # pass's own steps are committed by the next pass.
                self._run_pass(
                    training_order(start, end - start, self.num_layers),
                    commit_before=start,
                    answered=answered,
                )
            except BaseException:
                record(start, answered, before)  # the steps it completed are done
                failures += 1
                raise
            states = self.supervisor.collect_pass_states()
            record(start, answered, before)
            self.supervisor.pass_states.update(states)

        self._recovering(first, one_attempt, failed_step=lambda: first + len(records))
        return records

    @property
    def _is_classifier(self) -> bool:
        return self.task == "classification"

    def evaluate(self, step: int) -> EvalRecord:
        def passes() -> LayerAck:
            self._commit_ended()
            acks = self._run_pass([(step, layer, Phase.EVAL) for layer in range(self.num_layers)])
            self.supervisor.pass_states.update(self.supervisor.collect_pass_states())
            return acks[-1]

        ack, _ = self._recovering(step, passes)
        return EvalRecord(
            step=step,
            loss=ack.loss_sum / ack.num_targets,
            accuracy=ack.num_correct / ack.num_targets if self._is_classifier else None,
            num_samples=ack.num_targets // self.tokens_per_sample,
        )

    def fetch_weights(self, step: int) -> list[dict[str, torch.Tensor]]:
        """fp32 master weights of every layer at version ``step``, read back over gRPC."""
        weights, _ = self._recovering(step, lambda: self._fetch_weights(step))
        return weights

    def _fetch_weights(self, step: int) -> list[dict[str, torch.Tensor]]:
        self._commit_ended()
        layout = self.memoryx.layout()
        weights = []
        self.fetched_masks: list[dict[str, torch.Tensor]] = []
        for index, layer in enumerate(layout.layers):
            tensors, masks = self.memoryx.fetch_layer(index, step, layer.spec, dtype="float32")
            weights.append(tensors)
            # Masks of the tensors that came sparse (values + index): what MemoryX prunes.
            self.fetched_masks.append(masks)
        return weights

    def weight_densities(self) -> list[float]:
        """Per layer, the share of its weights that no sparsity mask prunes (1.0: dense)."""
        densities = []
        for layer in self.memoryx.layout().layers:
            numel = sum(int(torch.Size(t.shape).numel()) for t in layer.tensors)
            densities.append(layer.num_kept / numel if numel else 1.0)
        return densities

    def save_checkpoint(self, path: str) -> list[CheckpointInfo]:
        """MemoryX saves into the run's checkpoint directory; the driver copies it to ``path``."""
        saved = self._save_in_run_dir()
        self.cluster.export_checkpoint(saved[0].name, path)
        return saved

    def _save_in_run_dir(self) -> list[CheckpointInfo]:
        """Every MemoryX server saves its committed state in the run's checkpoint directory."""
        self._commit_ended()
        saved = self.memoryx.save_checkpoint()
        names = {info.name for info in saved}
        if len(names) != 1:
            raise RuntimeError(f"the MemoryX servers saved different checkpoints {sorted(names)}.")
        if self.config.memoryx.directory_checkpoints:
            # Every server wrote its layers and part there; the manifest, last, makes it whole.
            directory = confined_path(self.cluster.checkpoint_dir, saved[0].name)
            write_manifest(
                directory, sorted(directory.glob("part-*.json")), optimizer=self.config.optimizer
            )
        return saved

    def periodic_checkpoint(self, step_done: int, first_step: int) -> str | None:
        """After step ``step_done``: a checkpoint in ``checkpoint.dir`` if one is due."""
        if not self.checkpoints.due(step_done, first_step):
            return None
        path, _ = self._recovering(step_done + 1, self.checkpoint_to_dir)
        return path

    def checkpoint_to_dir(self) -> str:
        """MemoryX's committed state as a checkpoint in ``checkpoint.dir``, beside the
        periodic ones (``--resume DIR|auto`` finds it); returns its path."""
        path, name = self.checkpoints.save(
            lambda: self._save_in_run_dir()[0].name, self.cluster.export_checkpoint
        )
        # What a new MemoryX loads: its own file, in the run directory.
        self.supervisor.latest_checkpoint = name
        self.supervisor.latest_export = path
        self.remove_initial_copy()  # restarts take the checkpoint from now on
        return path

    def rewind(self, step: int) -> None:
        """MemoryX came back at ``step``: forget the records of the steps it lost; the
        nodes' device state goes back to what it was then."""
        self.steps = [s for s in self.steps if s.step < step]
        self._uncommitted = None  # (MemoryX came back with every step it holds committed)
        self.supervisor.rewind_nodes(step)

    def traffic(self) -> dict:
        self._commit_ended()  # (its state and peak memory as the run leaves them)
        return cluster_traffic(self.memoryx, self.cluster)
