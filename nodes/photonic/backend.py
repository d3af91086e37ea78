"""The photonic compute-node backend: streamed layers on MZI meshes, trained three ways.

``training`` picks how a layer learns (docs/hardware.md §4.2, §4.3); each method is a
strategy object in ``nodes.photonic.training`` that runs on this backend's meshes and counters:

- ``backprop``: the "computer-designed" baseline. ``prepare_layers`` turns every
  ``nn.Linear`` into a ``MeshLinear`` whose parameters are phases (initialized from the
  Clements/SVD decomposition of the original weights); training runs forward and backward on
  the ideal digital twin (autograd through the mesh model); evaluation runs on the physical
  node: that is deployment, hidden fabrication errors included.
- ``ffm``: fully forward mode. Same phase parameters, but forward runs on the physical node
  and the phase gradients are measured on it by launching the conjugated error through the
  same hardware; no twin is used. Only layers made of Linear and parameter-free modules have
  such a gradient; anything else is refused.
- ``dfa``: direct feedback alignment. Weights stay digital (W streams as usual for the
  forward pass); the backward pass needs no weights (``needs_weights_in_backward = False``,
  so no weights stream back in). The last layer receives e = dL/dlogits as ``grad_y`` and
  hands e down unchanged as its "input gradient", so every lower layer receives e directly and
  computes delta_l = (B_l e) * f'(a_l) with its own fixed random B_l, from the pre-activation
  a_l it kept in the forward pass. Limitation: the DFA forward computes W x exactly (an ideal
  mesh programmed from W), because decomposing W onto the physical mesh at every step costs a
  Clements decomposition per tile (0.5 s for 64 modes here); the photonic noise of DFA is on
  the feedback projection (``dfa.noise``).

Multi-path diffractive stages (``multipath.py``, the zoo's ``taichi-digits``) run the same
way: on the ideal twin for ``backprop`` training, on the node's ``PhysicalOptics`` (the
device's phase errors on every mask pixel and MZI, its insertion loss, detection noise and
ADC) for evaluation and for ``ffm``, whose mask and MZI phase gradients are measured on them.
``dfa`` refuses them (they are not Linear layers). The ``photonic.*`` counters cover
``MeshLinear`` layers only; the emulated clock costs the stages from their ``optical_pass()``
(``nodes.photonic.engine``).

Blocks that were not prepared (a plain ``nn.Linear`` arriving with a ``weight``) still work:
their ``F.linear`` calls are programmed onto the mesh on the fly (cached per weight value).

Programming a streamed layer sets phases: thermal tuning time and heater energy
(``PhotonicCost.reconfiguration``) per tile, on ``num_cores`` cores tuning in parallel. MVM
time and energy come from ``PhotonicCost.matmul``. ``stats()`` reports both.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from core.config import doc
from core.cost.engine import DigitalUnit
from core.cost.hardware import Hardware
from nodes.backend import Backend, call_block
from nodes.photonic.clements import UnitPhases
from nodes.photonic.device import PhotonicCore
from nodes.photonic.dfa import DirectFeedbackAlignment
from nodes.photonic.engine import PhotonicEngine
from nodes.photonic.layer import (
    MeshLinear,
    Tiles,
    ffm_apply,
    ideal_apply,
    run_tiles,
    stack_program,
    use_engine,
)
from nodes.photonic.mesh import require_mesh_size
from nodes.photonic.multipath_optics import PhysicalOptics, use_optics
from nodes.photonic.preset import PresetDevice, load_preset
from nodes.photonic.training import TRAINING_METHODS, TrainingMethod

#: Weights of plain ``nn.Linear`` blocks programmed on the fly, by value (eval re-uses them).
_PROGRAM_CACHE_SIZE = 64


class PhotonicBackend(Backend):
    @dataclass(kw_only=True)
    class Config(Backend.Config):
        kind: Literal["photonic"] = doc(
            "backend: photonic MZI-mesh compute nodes", default="photonic"
        )
        training: Literal["backprop", "dfa", "ffm"] = doc(
            "'backprop': gradients from the digital twin, deployed (evaluated) on the physical "
            "node, the computer-designed baseline; 'dfa': direct feedback alignment, no weights "
            "in the backward pass; 'ffm': fully forward mode, phase gradients measured on the "
            "physical node, no twin",
            default="backprop",
        )
        mesh_size: int = doc(
            "modes per mesh = tile size, count (sets device.mesh_size); 64 as PACE (docs/hardware.md §4.5)",
            default=64,
        )
        num_cores: int = doc(
            "MZI units per node; tile t runs on core t % num_cores, count", default=1
        )
        # Typed PresetDevice so that a partial YAML `device:` overlays the realistic preset
        # (PhotonicCore.Config's own defaults are ideal); __post_init__ makes it plain again.
        device: PresetDevice = doc(
            "the physical device: the realistic photonic_taichi preset, overlaid by the sections "
            "given (a section given as null is ideal)",
            default_factory=load_preset,
        )
        seed: int = doc(
            "seed of the hidden fabrication errors of the node's cores (core k: seed + k)",
            default=0,
        )
        dfa: DirectFeedbackAlignment.Config = doc(
            "DFA feedback projection (training = 'dfa'): photonic noise on B_l e",
            default_factory=DirectFeedbackAlignment.Config,
        )
        digital: DigitalUnit.Config = doc(
            "the node's digital unit (the twin's training, biases, DFA updates) in the emulated "
            "clock",
            default_factory=DigitalUnit.Config,
        )

        def __post_init__(self) -> None:
            require_mesh_size(self.mesh_size)
            if self.num_cores < 1:
                raise ValueError(
                    f"num_cores = {self.num_cores} is not valid; a node needs at least 1 core."
                )
            if isinstance(self.device, PresetDevice):
                self.device = self.device.plain()
            if self.device.mesh_size != self.mesh_size:
                self.device = dataclasses.replace(self.device, mesh_size=self.mesh_size)

        @classmethod
        def ideal(cls, **overrides) -> PhotonicBackend.Config:
            """The ideal twin as the physical device: forward equals the digital layer."""
            mesh_size = overrides.pop("mesh_size", 64)
            return cls(
                mesh_size=mesh_size, device=PhotonicCore.Config(mesh_size=mesh_size), **overrides
            )

        @property
        def method(self) -> TrainingMethod:
            """``training`` as its strategy object (``nodes.photonic.training``)."""
            return TRAINING_METHODS[self.training]

        @property
        def needs_weights_in_backward(self) -> bool:
            return self.method.needs_weights_in_backward

        def twin(self) -> PhotonicBackend.Config:
            """This config with the device replaced by its ideal twin (what a computer designs with)."""
            return dataclasses.replace(self, device=self.device.twin())

        def check_sparsity(self, sparsity) -> None:
            self.method.check_sparsity(sparsity)

        def build(self) -> PhotonicBackend:
            return PhotonicBackend(self)

        def engine(self, hardware: Hardware.Config) -> PhotonicEngine:
            return PhotonicEngine(self)

    def __init__(self, config: Config) -> None:
        self.config = config
        self.method = config.method
        #: What the training method keeps between a layer's forward and backward (DFA).
        self.method_state = self.method.new_state()
        self.cost = config.device.cost.build()
        self._tiles: Tiles | None = None  # built on first use: the driver never needs them
        self._optics: PhysicalOptics | None = None  # likewise, for multi-path (Taichi) stages
        self._held: list[UnitPhases | None] = [None] * config.num_cores
        self._counters: dict[str, float] = {}
        self._programs: dict[tuple, dict[str, Tensor]] = {}

    # ---- Backend interface -------------------------------------------------------------

    def prepare_layers(self, layers: list[nn.Module]) -> list[nn.Module]:
        layers = [self.method.prepare_layer(layer, self.config.mesh_size) for layer in layers]
        self.check_layers(layers)
        return layers

    def check_layers(self, layers: list[nn.Module]) -> None:
        for index, layer in enumerate(layers):
            self.method.check_layer(index, layer)

    def forward(self, layer: int, block: nn.Module, params: dict[str, Tensor], x: Tensor) -> Tensor:
        with torch.no_grad():
            return self.method.forward(self, layer, block, params, x)

    def backward(self, layer, block, params, x, grad_y):
        return self.method.backward(self, layer, block, params, x, grad_y)

    def stats(self) -> dict[str, float]:
        return dict(self._counters)

    # ---- Mesh layers -------------------------------------------------------------------

    @property
    def optics(self) -> PhysicalOptics:
        """The node's physical diffractive and MZI hardware for multi-path (Taichi) stages."""
        if self._optics is None:
            c = self.config
            self._optics = PhysicalOptics(c.device, c.seed, c.num_cores)
        return self._optics

    @property
    def tiles(self) -> Tiles:
        if self._tiles is None:
            c = self.config
            self._tiles = Tiles([c.device.build(c.seed + k) for k in range(c.num_cores)])
        return self._tiles

    def run(self, layer: int, block, params, x, *, physical: bool, ffm: bool = False) -> Tensor:
        """The block on the physical node (``ffm``: keeping what FFM's gradient needs) or on
        the ideal twin (``physical=False``)."""

        def engine(module: MeshLinear, x_BI: Tensor) -> Tensor:
            if not physical:
                return ideal_apply(module, x_BI)
            self._account(layer, module, x_BI.shape[0])
            if ffm:
                return ffm_apply(module, self.tiles, x_BI)
            return run_tiles(module, self.tiles, x_BI, module.phases(), module.gain.double())

        mode = _OnTheFly(self, layer, params, physical, ffm)
        optics = self.optics.at(layer, ffm=ffm) if physical else None  # None: the ideal twin
        with use_engine(engine), use_optics(optics), mode:
            return call_block(block, {n: p.float() for n, p in params.items()}, x)

    def program_weight(self, w_OI: Tensor) -> MeshLinear:
        """A plain Linear weight as a ``MeshLinear`` (no bias), its decomposition cached by value."""
        key = (tuple(w_OI.shape), hash(w_OI.detach().double().numpy().tobytes()))
        if key not in self._programs:
            if len(self._programs) >= _PROGRAM_CACHE_SIZE:
                self._programs.pop(next(iter(self._programs)))
            self._programs[key] = stack_program(w_OI.detach().double(), self.config.mesh_size)
        module = MeshLinear(w_OI.shape[1], w_OI.shape[0], self.config.mesh_size)
        with torch.no_grad():
            for name, value in self._programs[key].items():
                getattr(module, name).copy_(value)
        return module

    # ---- Counters ----------------------------------------------------------------------

    def _count(self, name: str, value: float) -> None:
        self._counters[name] = self._counters.get(name, 0.0) + value

    def _account(self, layer: int, module: MeshLinear, num_vectors: int) -> None:
        """Programming (phases set per tile, cores tuning in parallel) and the MVMs of one pass."""
        phases = [p.detach() for p in module.phases()]
        tuning_s = [0.0] * self.config.num_cores
        energy_j, changed = 0.0, 0
        for t in range(module.num_tiles):
            core = t % self.config.num_cores
            tile = UnitPhases.from_tensors([p[t] for p in phases])
            held = self._held[core] or UnitPhases.from_tensors(
                [torch.zeros_like(p) for p in tile.tensors()]
            )
            step = self.cost.reconfiguration(held, tile)
            tuning_s[core] += step.time_s
            energy_j += step.energy_j
            changed += step.num_shifters_changed
            self._held[core] = tile
        self.count_program(layer, max(tuning_s), energy_j, changed)
        self.count_mvms(module.out_features, module.in_features, num_vectors)

    def count_program(self, layer: int, time_s: float, energy_j: float, changed: float) -> None:
        self._count("photonic.programmings", 1.0)
        self._count("photonic.shifters_changed", float(changed))
        self._count("photonic.program_time_s", time_s)
        self._count("photonic.program_energy_j", energy_j)
        self._count(f"photonic.layer.{layer}.program_time_s", time_s)
        self._count(f"photonic.layer.{layer}.program_energy_j", energy_j)

    def count_mvms(
        self, num_outputs: int, num_inputs: int, num_vectors: int, prefix: str = "mvm"
    ) -> None:
        n = self.config.mesh_size
        num_tiles = math.ceil(num_outputs / n) * math.ceil(num_inputs / n)
        # Reprogramming is counted by _count_program.
        cost = self.cost.streamed_matmul(
            num_outputs, num_inputs, num_vectors, n, self.config.num_cores
        )
        self._count(f"photonic.{prefix}_vectors", float(num_tiles * num_vectors))
        self._count(f"photonic.{prefix}_ops", cost.ops)
        self._count(f"photonic.{prefix}_time_s", cost.time_s)
        self._count(f"photonic.{prefix}_energy_j", cost.energy_j)


class _OnTheFly(TorchFunctionMode):
    """Programs ``F.linear`` on streamed plain Linear weights onto the mesh (unprepared blocks)."""

    def __init__(self, backend: PhotonicBackend, layer: int, params, physical: bool, ffm: bool):
        super().__init__()
        self.backend, self.layer, self.physical, self.ffm = backend, layer, physical, ffm
        self.weights = {id(p) for p in params.values()}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear and self.physical:
            x, weight = args[0], args[1] if len(args) > 1 else kwargs["weight"]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            if id(weight) in self.weights or weight.dtype == torch.float32:
                if self.ffm and torch.is_grad_enabled():
                    raise ValueError(
                        f"training = 'ffm' on layer {self.layer}: its Linear was not prepared as "
                        "phases (Backend.prepare_layers); ffm has no forward-only gradient for "
                        "digital weights."
                    )
                with torch.no_grad():
                    module = self.backend.program_weight(weight)
                    y = module(x)  # runs the engine set by the backend: the physical cores
                return y if bias is None else y + bias
        return func(*args, **kwargs)
