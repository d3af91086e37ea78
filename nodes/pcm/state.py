"""What a weight-stationary PCM node's arrays hold between passes, as small records.

``nodes.pcm.backend`` keeps, per matrix, how it was programmed (``Provenance``) instead of a
second copy of its conductances: the pass-start snapshot (``_ArrayState``) and the state a
replacement adopts (``PcmPassState``) are made of these records, a few KB per matrix.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from torch import Tensor

from nodes.pcm.tile import ProgrammedMatrix


@dataclass(frozen=True, eq=False)
class Provenance:
    """How one matrix's arrays were programmed: enough to program them again bitwise.

    Programming noise, drift exponents and the compensation baseline are drawn from the
    layer's generator in ``program_layer``, so its state then, with the same weights,
    reproduces the arrays; ``digest`` identifies those weights (their conductance targets
    and tile scales, what ``WeightStationaryMode.resident`` compares). A few KB, against the
    conductances' 3 x 2 x 4 bytes per weight.
    """

    generator_state: Tensor | None
    digest: bytes
    #: The emulated clock when the programming finished, s and exact fs (ages are differences).
    programmed_at_s: float
    programmed_at_fs: int

    @property
    def nbytes(self) -> int:
        state = self.generator_state
        return len(self.digest) + (0 if state is None else state.numel() * state.element_size())


#: A pending entry for arrays that held nothing at the pass start: programmed afresh.
_ABSENT = Provenance(generator_state=None, digest=b"", programmed_at_s=0.0, programmed_at_fs=0)


@dataclass
class _ArrayState:
    """What weight-stationary arrays held when a pass began (shared, never mutated, records)."""

    held: dict = field(default_factory=dict)
    compensation: dict = field(default_factory=dict)
    clock_s: float = 0.0
    clock_fs: int = 0


@dataclass
class PcmPassState:
    """A weight-stationary node's arrays between passes, as its replacement adopts them
    (``PcmBackend.pass_state``): small, picklable, no conductances."""

    #: The last pass (step, kind) the node began: its replacement continues after it.
    after: tuple[int, int]
    held: dict[tuple[int, str], Provenance]
    compensation: dict[tuple[int, str], tuple[float, Tensor]]
    clock_s: float
    clock_fs: int


def _target_digest(g_target_SRCIO: Tensor, scale_RC: Tensor) -> bytes:
    digest = hashlib.sha256()
    for tensor in (g_target_SRCIO, scale_RC):
        digest.update(str((tuple(tensor.shape), tensor.dtype)).encode())
        digest.update(tensor.contiguous().numpy().tobytes())
    return digest.digest()


def _tensor_bytes(programmed: ProgrammedMatrix) -> int:
    tensors = (
        programmed.g_target_SRCIO,
        programmed.g_programmed_SRCIO,
        programmed.drift_exponent_SRCIO,
        programmed.weight_scale_RC,
        programmed.bias_O,
        programmed.drift_baseline,
    )
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


class PassStateMixin:
    """``PcmBackend``'s arrays across passes: the pass-start snapshot, a re-run's return to
    it, and the state a replacement adopts (``Backend.begin_pass``, ``pass_state``)."""

    def begin_pass(self, step: int, kind: int) -> None:
        """Remember what the arrays hold as pass (step, kind) begins; on a re-run, go back to it.

        Only weight-stationary arrays outlive a pass; streaming mode programs every matrix
        when it is used. The arrays, their programming times and drift compensation and the
        clock go back (a re-run reads exactly what the first attempt read); wear and the
        counters keep the aborted attempt's writes and reads, which the devices did take. An
        older pass (a rewind to a checkpoint) starts from empty arrays: every matrix is
        programmed afresh, as it was then unless an earlier pass had left it resident.

        The snapshot is copy-on-write and small: it keeps each matrix's ``Provenance`` (a
        generator state and a digest), never a second copy of the conductances. A matrix
        the aborted attempt reprogrammed goes back as pending: the re-run streams the same
        weights, which differ from the pass-start ones, so it is reprogrammed anyway.
        """
        if not self.operating_mode.arrays_outlive_a_pass:
            return
        key = (step, kind)
        if self._pass_start is not None and key <= self._pass_start[0]:
            began, state = self._pass_start
            self._restore(
                state
                if began == key
                else _ArrayState(clock_s=self.clock_s, clock_fs=self._clock_fs)
            )
        self._pass_start = (key, self._array_state())

    def _array_state(self) -> _ArrayState:
        return _ArrayState(
            held={**self._provenance, **self._pending},
            compensation=dict(self._compensation),
            clock_s=self.clock_s,
            clock_fs=self._clock_fs,
        )

    def _restore(self, state: _ArrayState) -> None:
        # Arrays still holding the programming the state names keep it; any other matrix
        # (reprogrammed, or first programmed, since) is pending: what the state says, or
        # absent.
        self._pending = {
            key: held
            for key in {*self._programmed, *self._pending, *state.held}
            if (held := state.held.get(key, _ABSENT)) is not self._provenance.get(key)
        }
        self._compensation = dict(state.compensation)
        self.clock_s, self._clock_fs = state.clock_s, state.clock_fs

    def pass_state(self) -> PcmPassState | None:
        """What a replacement of this node needs to read its arrays bit-identically.

        Taken between passes (the driver asks once a pass has finished everywhere): the
        last pass begun, the clock, and each resident matrix's provenance and drift
        compensation. Small: no conductances (see ``Provenance``). None when the arrays do
        not outlive a pass or no pass has begun.
        """
        if not self.operating_mode.arrays_outlive_a_pass or self._pass_start is None:
            return None
        state = self._array_state()
        return PcmPassState(
            after=self._pass_start[0],
            held={k: p for k, p in state.held.items() if p is not _ABSENT},
            compensation=state.compensation,
            clock_s=state.clock_s,
            clock_fs=state.clock_fs,
        )

    def adopt_pass_state(self, state: PcmPassState | None) -> None:
        """Continue as the node whose ``pass_state()`` this is: a replacement's arrays, or
        any node's when MemoryX came back at an earlier step (None: empty arrays).

        Every matrix is pending until first read: programmed then from its provenance if
        the weights streamed are those it held (as the lost node would have read it,
        resident), else afresh. A pass after ``state.after`` starts from this state; the
        same pass or an earlier one is a rewind, from empty arrays.
        """
        self._programmed, self._provenance = {}, {}
        if state is None:
            self._pending, self._compensation, self._pass_start = {}, {}, None
            return
        self._pending = dict(state.held)
        self._compensation = dict(state.compensation)
        self.clock_s, self._clock_fs = state.clock_s, state.clock_fs
        self._pass_start = (
            state.after,
            _ArrayState(clock_s=state.clock_s, clock_fs=state.clock_fs),
        )

    @property
    def held_bytes(self) -> int:
        return self.array_bytes

    @property
    def array_bytes(self) -> int:
        """Bytes of the emulated arrays' state this node holds (conductances, drift
        exponents, scales) plus the pass-start snapshot's provenance records."""
        matrices = sum(_tensor_bytes(p) for p in self._programmed.values())
        records = {*self._provenance.values(), *self._pending.values()}
        if self._pass_start is not None:
            records.update(self._pass_start[1].held.values())
        compensation = sum(s.numel() * s.element_size() for _, s in self._compensation.values())
        return matrices + compensation + sum(r.nbytes for r in records if r is not _ABSENT)


__all__ = ["PassStateMixin", "PcmPassState", "Provenance"]
