"""Fault handling: find a dead or hung component, replace it, and re-run the step.

The driver watches the cluster in two ways:
  - every RPC has a deadline derived from the bytes it moves (``proto.clients.Deadlines``);
  - while a layer pass is under way, and whenever a step fails, every component's
    standard gRPC health check (``grpc.health.v1``) is probed with a short deadline
    (``runtime.health_timeout_s``); Ray's view of the actor (dead, or not answering)
    is added to the cause.

A compute node or SwarmX node that is lost is replaced by a new actor started
with the original constructor arguments (same rank, data shard, seed and backend
config), and the tree is rewired around it. A node's state is a function of the
config, the seed, its rank and the weights MemoryX streams it, so the re-run of
the interrupted step is bit-identical. A lost MemoryX server is restarted, with
every other server (``memoryx.num_servers``), from the newest periodic checkpoint
(``checkpoint: {every_steps, dir, keep}``), or from the run's start, and the
steps since are run again (``Rewind``).
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import ray

from core.atomic import write_json_atomic
from emulator.component_specs import memoryx_name
from emulator.config import CheckpointConfig, RuntimeConfig
from emulator.launch import Cluster
from emulator.shards import MemoryXServers
from memoryx.checkpoint import MANIFEST_NAME
from proto.clients import HEALTH_TIMED_OUT as SLOW
from proto.clients import Deadlines, HealthClient, RpcError


def deadlines(runtime: RuntimeConfig) -> Deadlines:
    """The RPC deadline constants of ``runtime``."""
    return Deadlines(
        call_timeout_s=runtime.rpc_timeout_s,
        min_rate_bytes_per_s=runtime.min_bandwidth_bytes_per_s,
        layer_timeout_s=runtime.layer_timeout_s,
    )


class ComponentLost(Exception):
    """Health probes found components dead or hung: name -> cause."""

    def __init__(self, problems: dict[str, str]):
        self.problems = problems
        super().__init__("; ".join(f"{n}: {why}" for n, why in problems.items()))


class StateUnread(Exception):
    """The nodes' kept state could not be read after a pass, yet every component answers:
    the pass runs again (a transient failure, within ``runtime.max_step_retries``)."""


class Rewind(Exception):
    """MemoryX was restarted from an earlier state: the run continues from ``step``."""

    def __init__(self, step: int):
        self.step = step
        super().__init__(f"MemoryX restarted at step {step}")


class RunFailed(Exception):
    """The run cannot go on; the message is one paragraph naming component, step and cause.

    ``partial`` is set by ``train``: the report of the steps done so far.
    """

    def __init__(self, message: str, *, component: str, step: int, cause: str):
        super().__init__(message)
        self.component = component
        self.step = step
        self.cause = cause
        self.partial: dict | None = None
        self.checkpoint: str | None = None


@dataclass
class Restart:
    """One replaced component: what was lost, when, why and how long recovery took."""

    component: str
    step: int
    cause: str
    #: Wall-clock time (time.time()) the loss was detected, s.
    detected_at_s: float
    #: Seconds to start the replacement and rewire the tree, s.
    restart_s: float
    #: Wall-clock time the step it interrupted finished on the repaired cluster, s.
    step_done_at_s: float | None = None
    #: "replaced", or "shrunk" (runtime.on_node_loss: shrink; the survivors took its shard).
    action: str = "replaced"
    #: The other components of its process, replaced (or dropped) with it.
    same_process: list[str] = field(default_factory=list)


def _checkpoint_name(step: int) -> str:
    return f"step-{step:08d}.pt"


#: A periodic checkpoint: a file, or a directory of a tiered or sharded MemoryX.
_CHECKPOINT_RE = re.compile(r"^step-(\d{8})(\.pt)?$")
RUN_INFO = "run.json"


class CheckpointDir:
    """The run's periodic checkpoints: ``DIR/step-<k>.pt`` (MemoryX at version k), newest ``keep``.

    A checkpoint holds the weights, optimizer state, masks and per-layer versions
    (``memoryx.checkpoint``). The step is the whole data position and RNG state:
    batches are ``BatchSampler(seed).shard(step, rank)`` and every random draw
    (dropout, device noise, mask regrowth) is seeded by (seed, rank, step, layer).
    ``run.json`` beside them records the step the run ends at, for ``--resume DIR``.
    """

    def __init__(self, config: CheckpointConfig):
        self.config = config
        self.dir = Path(config.dir) if config.dir is not None else None

    def check_writable(self) -> None:
        """ValueError, before any actor starts, if checkpoints could not be written."""
        if self.dir is None:
            return
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            probe = self.dir / ".write-test"
            probe.write_bytes(b"x")
            probe.unlink()
        except OSError as exc:
            raise ValueError(
                f"checkpoint.dir = {str(self.dir)!r} is not a writable directory ({exc.strerror}); "
                "choose a directory this user can write, or leave checkpoint.dir unset."
            ) from None

    def write_run_info(self, final_step: int, seed: int) -> None:
        if self.dir is not None:
            write_json_atomic(self.dir / RUN_INFO, {"final_step": final_step, "seed": seed})

    def due(self, step_done: int, first_step: int) -> bool:
        """True if a checkpoint is due after step ``step_done`` finished."""
        every = self.config.every_steps
        return bool(self.dir is not None and every and (step_done + 1 - first_step) % every == 0)

    def save(
        self, save_in_run_dir: Callable[[], str], export: Callable[[str, Path], None]
    ) -> tuple[str, str]:
        """``save_in_run_dir`` has MemoryX save its committed state in the run directory
        and returns its name; ``export`` copies it (atomically) here. Returns the copy's
        path and MemoryX's name for it (a file, or a directory for tiered or sharded MemoryX)."""
        assert self.dir is not None
        name = save_in_run_dir()
        path = (self.dir / name).resolve()
        export(name, path)
        for old in self.list()[: -self.config.keep]:
            if old.is_dir():
                shutil.rmtree(old, ignore_errors=True)
            else:
                old.unlink(missing_ok=True)
        return str(path), name

    def list(self) -> list[Path]:
        """Checkpoints in the directory, oldest first."""
        if self.dir is None or not self.dir.is_dir():
            return []
        return sorted(p for p in self.dir.iterdir() if _CHECKPOINT_RE.match(p.name))


def remove_spill_dir(path: str | Path, root: str | Path) -> bool:
    """Remove a lost MemoryX server's spill directory ``path``; True if it was removed.

    Only a real directory (not a symlink) directly inside the spill root ``root``, named as
    MemoryX names them (``memoryx-<server>-...``), is removed; ``shutil.rmtree`` unlinks
    symlinks inside it without following them. Anything else is left alone.
    """
    path, root = Path(path), Path(root).resolve()
    if path.is_symlink() or not path.is_dir() or not path.name.startswith("memoryx-"):
        return False
    if path.resolve().parent != root or path.parent.resolve() != root:
        return False
    shutil.rmtree(path, ignore_errors=True)
    return not path.exists()


def newest_checkpoint(directory: str | Path) -> tuple[str, int | None]:
    """The newest ``step-<k>.pt`` (or directory ``step-<k>``) in ``directory`` and the run's final step (``run.json``)."""
    directory = Path(directory)
    # A directory checkpoint is whole once its manifest is there (written last).
    found = sorted(
        p
        for p in directory.iterdir()
        if _CHECKPOINT_RE.match(p.name) and (p.is_file() or (p / MANIFEST_NAME).is_file())
    )
    if not found:
        raise ValueError(
            f"resume = {str(directory)!r} is a directory without checkpoints (step-<k>.pt); "
            "point it at a checkpoint file or at a run's checkpoint.dir."
        )
    final_step = None
    info = directory / RUN_INFO
    if info.is_file():
        final_step = int(json.loads(info.read_text())["final_step"])
    return str(found[-1].resolve()), final_step


def checkpoint_step(path: str | Path) -> int | None:
    match = _CHECKPOINT_RE.match(Path(path).name)
    return int(match.group(1)) if match else None


@dataclass
class Supervisor:
    """Finds lost components and replaces them, within ``runtime.max_restarts``."""

    cluster: Cluster
    runtime: RuntimeConfig
    checkpoints: CheckpointDir
    #: Called after MemoryX restarted empty (no checkpoint to load): reload the initial weights.
    reload_weights: Callable[[], None] | None = None
    #: The global batch (shrinking needs it to divide across the surviving nodes), samples.
    batch_size: int = 0
    restarts: list[Restart] = field(default_factory=list)
    #: Failures after which every component answered: the step was simply run again.
    retried: list[dict] = field(default_factory=list)
    #: The newest periodic checkpoint, by MemoryX's name for it in the run directory (what a
    #: new MemoryX resumes from); None: the original arguments (the run's start or --resume).
    latest_checkpoint: str | None = None
    #: Path of the newest periodic checkpoint's copy in ``checkpoint.dir``.
    latest_export: str | None = None
    #: Per compute node whose backend keeps state between passes (PCM weight-stationary
    #: arrays): its ``pass_state()`` after the last pass that finished (a training step once
    #: MemoryX committed it). A replacement starts from it, so it reads what the lost node
    #: would have.
    pass_states: dict[str, object] = field(default_factory=dict)
    #: ``pass_states`` as they were before a training step that MemoryX may come back at
    #: (the run's first, the newest checkpoint's), by step.
    states_at: dict[int, dict[str, object]] = field(default_factory=dict)
    #: The spill directory of each MemoryX server's disk tier (``memoryx.spill_dir``), by name.
    spill_dirs: dict[str, str] = field(default_factory=dict)
    #: ``memoryx.spill_dir``: the only directory whose entries a lost server's are removed from.
    spill_root: str | None = None

    def probe(self) -> dict[str, str]:
        """Components that are dead or hung: name -> cause.

        A component is lost if its health check fails at once (refused: the process is
        gone), or if it times out and the actor does not answer Ray within the same
        timeout either (stopped or hung). A health check that is merely slow while Ray
        still reaches the process means an overloaded machine, not a lost component.
        """
        timeout_s = self.runtime.health_timeout_s
        # One component per process: the process is the fault unit (a lost member is a
        # lost process), so a probe costs RPCs per process, not per emulated node; with
        # many nodes to a process and passes that take longer the more nodes there are,
        # probing them all would make the probes of a step grow as N squared.
        probed: dict[int, tuple[str, str]] = {}
        for name, address in self.cluster.addresses.items():
            probed.setdefault(id(self.cluster.handle(name)), (name, address))
        pending = {
            name: HealthClient(address, self.cluster.security).start_check(timeout_s)
            for name, address in probed.values()
        }
        problems = {name: p.problem() for name, p in pending.items()}
        lost = {}
        # Components of one process share Ray's verdict: asked once per process.
        verdicts: dict[int, str | None] = {}
        for name, why in problems.items():
            if why is None:
                continue
            process = id(self.cluster.handle(name))
            if process not in verdicts:
                verdicts[process] = self._ray_verdict(name)
            verdict = verdicts[process]
            if verdict is None and why.startswith(SLOW):
                continue
            lost[name] = why if verdict is None else f"{why}; {verdict}"
        return lost

    def _ray_verdict(self, name: str) -> str | None:
        """What Ray knows of the actor (dead, or not answering); None if it answers."""
        try:
            ray.get(self.cluster.handle(name).pid.remote(), timeout=self.runtime.health_timeout_s)
        except ray.exceptions.RayActorError as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            return f"Ray reports the actor dead ({first})"
        except ray.exceptions.GetTimeoutError:
            return "its process does not answer Ray either (stopped or hung)"
        return None

    def recover(self, step: int, error: BaseException) -> list[str]:
        """Replace every lost component after ``error`` ended a pass of ``step``.

        Returns the names replaced (empty: everything answers, so the failure was
        transient and the step is simply run again). Raises ``RunFailed`` when the
        restart budget is spent, ``Rewind`` when MemoryX came back at an earlier step.
        """
        problems = error.problems if isinstance(error, ComponentLost) else self.probe()
        rewind_to: int | None = None
        # The process is the fault unit: replacing (or dropping) one lost component's
        # process handles every component it ran, so those are not handled again.
        handled: set[str] = set()
        for name, cause in problems.items():
            if name in handled:
                continue
            same_process = [m for m in self.cluster.members(name) if m != name]
            handled.update([name, *same_process])
            if len(self.restarts) >= self.runtime.max_restarts:
                raise RunFailed(
                    f"{name} was lost during step {step} ({cause}), and the run has already "
                    f"replaced {len(self.restarts)} components, runtime.max_restarts = "
                    f"{self.runtime.max_restarts}; raise runtime.max_restarts or find why "
                    "components fail (see the Ray logs of the session).",
                    component=name,
                    step=step,
                    cause=cause,
                )
            detected = time.time()
            started = time.perf_counter()
            action = "replaced"
            try:
                if self.cluster.is_memoryx(name):
                    if rewind_to is None:  # one restart brings every server back
                        rewind_to = self._restart_memoryx(lost=name)
                elif self._can_shrink(name):
                    self.cluster.drop_node(name)
                    action = "shrunk"
                else:
                    states = {
                        m: {"pass_state": self.pass_states[m]}
                        for m in [name, *same_process]
                        if m in self.pass_states
                    }
                    self.cluster.restart(name, member_changes=states)
            except (RuntimeError, ValueError, ray.exceptions.RayError) as exc:
                raise RunFailed(
                    f"{name} was lost during step {step} ({cause}), and its replacement failed: "
                    f"{exc}",
                    component=name,
                    step=step,
                    cause=cause,
                ) from None
            self.restarts.append(
                Restart(
                    name,
                    step,
                    cause,
                    detected,
                    time.perf_counter() - started,
                    action=action,
                    same_process=same_process,
                )
            )
        if rewind_to is not None and rewind_to != step:
            raise Rewind(rewind_to)
        return list(problems)

    def _can_shrink(self, name: str) -> bool:
        """``on_node_loss: shrink``, a compute node, and the global batch divides across the rest."""
        survivors = len(self.cluster.node_names) - sum(
            m in self.cluster.node_names for m in self.cluster.members(name)
        )
        return (
            self.runtime.on_node_loss == "shrink"
            and name in self.cluster.node_names
            and survivors >= 1
            and self.batch_size % survivors == 0
        )

    def _restart_memoryx(self, lost: str) -> int:
        """Every MemoryX server anew from the newest checkpoint (or the run's start); their step.

        The servers that survived are at a later version than any checkpoint, so with
        several servers all of them restart, each taking its layers from the newest
        checkpoint (a directory covering every shard, whole once its manifest is written;
        a disk tier's too). The survivors are stopped first, which removes their spill files.
        """
        changes = {"resume": self.latest_checkpoint} if self.latest_checkpoint else {}
        names = [memoryx_name(k) for k in range(len(self.cluster.memoryx_servers))]
        survivors = [self.cluster.handle(n) for n in names if n != lost]
        if survivors:
            ray.wait(
                [h.stop.remote() for h in survivors],
                num_returns=len(survivors),
                timeout=self.runtime.health_timeout_s,
            )
        for name in names:
            self.cluster.restart(name, **changes)
        servers = MemoryXServers(
            self.cluster.memoryx_addresses,
            self.cluster.memoryx_shards or self.cluster.memoryx_layers,
            self.cluster.security,
            deadlines(self.runtime),
        )
        try:
            return self._replaced_spill_dirs(lost, servers.layout().step)
        except RpcError:  # an empty MemoryX answers FAILED_PRECONDITION
            if self.reload_weights is None:
                raise
        self.reload_weights()
        return self._replaced_spill_dirs(lost, servers.layout().step)

    def _replaced_spill_dirs(self, lost: str, step: int) -> int:
        """Once the new servers serve: the lost server's spill directory is removed (the
        survivors removed their own when stopped), and the new ones noted. Returns ``step``."""
        gone = self.spill_dirs.pop(lost, None)
        if gone is not None and self.spill_root is not None:
            remove_spill_dir(gone, self.spill_root)
        self.note_spill_dirs()
        return step

    def note_spill_dirs(self) -> None:
        """Ask every MemoryX server where its disk tier is (nothing to ask when not tiered)."""
        if self.spill_root is None:
            return
        names = [memoryx_name(k) for k in range(len(self.cluster.memoryx_servers))]
        refs = [self.cluster.call(n, "spill_dir") for n in names]
        # A server lost meanwhile is found by the next pass; its directory is then unknown.
        with contextlib.suppress(ray.exceptions.RayError, TimeoutError):
            found = ray.get(refs, timeout=self.runtime.rpc_timeout_s)
            self.spill_dirs = {n: d for n, d in zip(names, found, strict=True) if d is not None}

    def collect_pass_states(self) -> dict[str, object]:
        """Every stateful compute node's ``pass_state()``, asked once a pass has finished.

        Read through Ray, while probing health as a layer pass does: a node lost now takes
        its state with it, so it ends the pass (``ComponentLost``) and the pass runs again
        on its replacement, from the state kept after the pass before.
        """
        names = self._stateful_nodes()
        if not names:
            return {}
        refs = [self.cluster.call(n, "pass_state") for n in names]
        deadline = time.monotonic() + self.runtime.rpc_timeout_s
        while True:
            ready, _ = ray.wait(refs, num_returns=len(refs), timeout=self.runtime.health_interval_s)
            if len(ready) == len(refs):
                try:
                    return dict(zip(names, ray.get(refs), strict=True))
                except ray.exceptions.RayError as exc:
                    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                    problems = self.probe()
                    if problems:
                        raise ComponentLost(problems) from None
                    raise StateUnread(f"a node's state could not be read ({first})") from None
            problems = self.probe()
            if problems:
                raise ComponentLost(problems)
            if time.monotonic() > deadline:
                raise StateUnread(
                    f"no node state within runtime.rpc_timeout_s = {self.runtime.rpc_timeout_s} s"
                )

    def keeps_node_states(self) -> bool:
        """Whether a compute node's backend keeps state between passes (read after each)."""
        return bool(self._stateful_nodes())

    def _stateful_nodes(self) -> list[str]:
        return [
            n
            for n in self.cluster.node_names
            if self.cluster.specs[n][1]["backend"].keeps_state_between_passes
        ]

    def keep_states_at(self, step: int) -> None:
        """Before training step ``step``: keep the nodes' states, should MemoryX come back at
        it; only the run's first step and the newest checkpoint's are kept."""
        self.states_at[step] = dict(self.pass_states)
        newest = None if self.latest_checkpoint is None else checkpoint_step(self.latest_checkpoint)
        keep = {min(self.states_at), newest, step}
        self.states_at = {k: v for k, v in self.states_at.items() if k in keep}

    def rewind_nodes(self, step: int) -> None:
        """MemoryX came back at ``step``: every stateful node goes back to its state then.

        A node that does not answer is found lost by the next pass and replaced from the
        same state."""
        states = self.states_at.get(step, {})
        names = self._stateful_nodes()
        self.pass_states = {n: states[n] for n in names if n in states}
        refs = [self.cluster.call(n, "adopt_pass_state", states.get(n)) for n in names]
        with contextlib.suppress(ray.exceptions.RayError, TimeoutError):
            ray.get(refs, timeout=self.runtime.rpc_timeout_s)

    def step_done(self, step: int) -> None:
        """Stamp the restarts that interrupted ``step`` with the time the step finished."""
        now = time.time()
        for restart in self.restarts:
            if restart.step_done_at_s is None:
                restart.step_done_at_s = now

    def report(self) -> list[dict]:
        return [asdict(r) for r in self.restarts]


__all__ = [
    "CheckpointDir",
    "ComponentLost",
    "Restart",
    "Rewind",
    "RunFailed",
    "StateUnread",
    "Supervisor",
    "checkpoint_step",
    "deadlines",
    "newest_checkpoint",
    "remove_spill_dir",
]
