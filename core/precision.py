"""Number formats: the one vocabulary of precisions, from configs to the wire and the cost model.

A precision is named once (``Precision``: ``fp32``, ``bf16``, ``fp16``, ``cbfloat16``), and
``PRECISIONS`` says everything the code needs of it: bytes per element (the cost model),
the dtype name tensors carry on the wire (proto's tensor messages) and its torch dtype (the
nodes' numerics). Nothing else keeps a table of precisions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    import torch

Precision = Literal["fp16", "bf16", "cbfloat16", "fp32"]


@dataclass(frozen=True)
class NumberFormat:
    name: str
    bytes_per_element: int
    #: The dtype string of tensors on the wire, which is also the torch dtype's name; None
    #: for a format only the cost model knows (cbfloat16: Cerebras's, no torch dtype).
    wire_name: str | None

    @property
    def torch_dtype(self) -> torch.dtype:
        if self.wire_name is None:
            raise ValueError(
                f"precision {self.name!r} exists only in the cost model; a functional run needs "
                f"one of {', '.join(p.name for p in PRECISIONS.values() if p.wire_name)}."
            )
        import torch  # here, so the cost vocabulary stays importable without torch

        return getattr(torch, self.wire_name)


PRECISIONS: dict[str, NumberFormat] = {
    "fp16": NumberFormat("fp16", 2, "float16"),
    "bf16": NumberFormat("bf16", 2, "bfloat16"),
    "cbfloat16": NumberFormat("cbfloat16", 2, None),  # a 16-bit format
    "fp32": NumberFormat("fp32", 4, "float32"),
}


def precision_format(name: str) -> NumberFormat:
    """The format named ``name``; ValueError listing the names otherwise."""
    try:
        return PRECISIONS[name]
    except KeyError:
        raise ValueError(
            f"precision = {name!r} is not valid; choose one of {', '.join(PRECISIONS)}."
        ) from None


def wire_precision(wire_name: str) -> Precision:
    """The precision whose tensors travel as ``wire_name`` (``"float32"`` -> ``"fp32"``)."""
    for fmt in PRECISIONS.values():
        if fmt.wire_name == wire_name:
            return fmt.name
    raise ValueError(f"wire dtype {wire_name!r} is not a precision the emulator streams.")


__all__ = ["PRECISIONS", "NumberFormat", "Precision", "precision_format", "wire_precision"]
