"""The run's initial weights, one layer at a time: made, kept on disk, streamed to MemoryX.

A model beyond the driver's RAM is never whole in the driver: ``LayerWeights``
makes one layer's fp32 tensors at a time (from a model built on the meta device
and its recorded initialization, or from layers that hold their weights), and
``InitialCopy`` gives them again to a MemoryX lost before the first checkpoint,
without the driver keeping a copy in RAM: layers made from their recorded
initialization are made again (bitwise the same, in any order), others are kept
on disk in the run directory, one safetensors file per layer.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save
from torch import Tensor, nn

from core.atomic import write_bytes_atomic
from emulator.zoo.deferred import DeferredInit


class LayerWeights:
    """The initial fp32 weights of the streamed layers; ``weights[i]`` makes layer ``i``'s.

    ``init`` None: the layers hold their weights (a model built whole, a user's model).
    Else the layers are on the meta device and ``init`` materializes them bitwise as
    the whole build would have (emulator.zoo.deferred).
    """

    def __init__(self, layers: list[nn.Module], init: DeferredInit | None = None) -> None:
        self.layers = layers
        self.init = init

    def __len__(self) -> int:
        return len(self.layers)

    @property
    def remakeable(self) -> bool:
        """Every layer can be made again, bitwise, at any time (no copy needed)."""
        return self.init is not None

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        layer = self.layers[index]
        if self.init is not None:
            tensors = self.init.materialize(layer)
        else:
            tensors = {name: p.detach() for name, p in layer.named_parameters()}
        return {name: t.float().contiguous() for name, t in tensors.items()}

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        return (self[i] for i in range(len(self)))

    def layer_bytes(self, index: int) -> int:
        """fp32 bytes of layer ``index`` (from its shapes: nothing is made)."""
        return sum(p.numel() * 4 for p in self.layers[index].parameters())


#: The initial copy's folder in the run directory.
INITIAL_DIR = "initial-weights"


def _file_name(layer: int) -> str:
    return f"layer-{layer:05d}.safetensors"


class InitialCopy:
    """The initial weights for a load and for restarts; ``copy[i]`` is layer ``i``.

    Reading in layer order the first time makes each layer (``LayerWeights``), writes
    it atomically and hands it on; only the last one made stays in RAM (a layer split
    over MemoryX servers is asked for twice in a row). Any other read, e.g. a restart's,
    comes from disk; or, for ``remakeable`` weights, which are never written (a third
    of the state less on disk), the layer is made again.
    """

    def __init__(self, directory: Path, weights: LayerWeights) -> None:
        self.directory = directory
        self._layer_bytes = [weights.layer_bytes(i) for i in range(len(weights))]
        self._remake = weights if weights.remakeable else None
        self._writer: Iterator[dict[str, Tensor]] | None = self._write(weights)
        self._written = -1  # the last layer written
        self._last: dict[str, Tensor] | None = None

    def _write(self, weights: LayerWeights) -> Iterator[dict[str, Tensor]]:
        if self._remake is not None:
            yield from weights
            return
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        for index in range(len(weights)):
            tensors = weights[index]
            metadata = {"params": json.dumps(list(tensors))}  # safetensors sorts by name
            write_bytes_atomic(self.path(index), save(tensors, metadata=metadata))
            yield tensors

    def path(self, index: int) -> Path:
        return self.directory / f"layer-{index:05d}.safetensors"

    def __len__(self) -> int:
        return len(self._layer_bytes)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        if not 0 <= index < len(self):
            raise IndexError(f"layer {index} of {len(self)}")
        while self._writer is not None and self._written < index:
            self._last = None  # before the next is made: one layer in RAM
            self._last = next(self._writer)
            self._written += 1
        if index == self._written and self._last is not None:
            return self._last
        if self._remake is not None:
            return self._remake[index]
        with safe_open(str(self.path(index)), framework="pt") as file:
            names = json.loads(file.metadata()["params"])
            return {name: file.get_tensor(name) for name in names}

    def release(self) -> None:
        """Drop the last layer made from RAM (every layer is on disk once all were read)."""
        self._last = None

    def layer_bytes(self, index: int) -> int:
        return self._layer_bytes[index]

    def remove(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)


__all__ = ["INITIAL_DIR", "InitialCopy", "LayerWeights"]
