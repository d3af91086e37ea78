"""What a disk tier cannot do, in words: undo a step that some layers already took.

A disk tier's snapshot of version ``k`` keeps the weights only (what a re-run of
step ``k`` reads; ``layer_files.keep_weights_only``), so once a layer took step
``k``'s update, version ``k``'s optimizer state is gone from the store.
"""

from __future__ import annotations

from collections.abc import Sequence

from memoryx.store import NonFiniteUpdate, StepError


class NonFiniteNotUndone(NonFiniteUpdate):
    """A NaN/Inf update met part-way through a step that other layers already took."""

    def __init__(self, layer: int, step: int, problem: str, updated: Sequence[int]) -> None:
        self.layer, self.step = layer, step
        Exception.__init__(
            self,
            f"step {step}, layer {layer}: {problem}. MemoryX applied none of it to layer "
            f"{layer}; layers {list(updated)} had taken the step's update already, and a disk "
            "tier keeps only their previous weights (what a re-run reads), so the step cannot "
            "be undone or committed: resume from the last checkpoint. Lower optimizer.lr (or "
            "check the model and data).",
        )


def rollback_refused(step: int, updated: Sequence[int]) -> StepError:
    return StepError(
        f"cannot roll back step {step}: layers {list(updated)} took its update, and a disk "
        f"tier keeps only their version-{step} weights (what a re-run reads), not that "
        "version's optimizer state; resume from a checkpoint instead."
    )


def commit_refused(step: int) -> StepError:
    return StepError(
        f"cannot commit step {step}: a non-finite update stopped it after some layers took "
        "it, and a disk tier cannot undo those; resume from a checkpoint."
    )


__all__ = ["NonFiniteNotUndone", "commit_refused", "rollback_refused"]
