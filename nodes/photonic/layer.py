"""A linear layer re-parameterized as phases of tiled MZI units, and the optics that run it.

``MeshLinear`` replaces an ``nn.Linear`` (out x in) by ceil(out/N) x ceil(in/N) tiles of one
U diag(S) V^H unit each (``clements.tile_matrix``): its trainable parameters are the phases of
every tile (stacked on a leading tile axis, row-major), a digital gain per tile and the bias.
MemoryX stores and updates those phases; a node programs the streamed phases onto its mesh.

All tiles of a layer run at once: the phase tensors keep their tile axis, so one optical
element (a mesh column) acts on every tile's field in a single op. Tile t runs on core
t % num_cores of the node, with that core's hidden fabrication errors and losses.

Three ways to run a layer (chosen by the backend with ``use_engine``):

- ``ideal_apply``: the ideal twin, differentiable by autograd (training by ``backprop``);
- the physical cores without gradients (deployment, evaluation);
- ``ffm_apply``: the physical cores, whose backward is measured in fully forward mode
  (``ffm.py``): the conjugated error runs through the same noisy hardware.
"""

from __future__ import annotations

import contextvars
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nodes.photonic.clements import UnitPhases, tile_matrix
from nodes.photonic.device import PhotonicCore
from nodes.photonic.elements import OpticalElement, PhaseScreen, propagate
from nodes.photonic.ffm import ffm_backward, ffm_forward
from nodes.photonic.mesh import Attenuators, MeshLayout, MZIColumn

#: Parameter names of the phase tensors, in ``UnitPhases.tensors()`` order.
PHASE_NAMES = (
    "v_theta",
    "v_phi",
    "v_screen",
    "atten_theta",
    "atten_phi",
    "u_theta",
    "u_phi",
    "u_screen",
)

Engine = Callable[["MeshLinear", Tensor], Tensor]
_ENGINE: contextvars.ContextVar[Engine | None] = contextvars.ContextVar("mesh_engine", default=None)


@contextmanager
def use_engine(engine: Engine) -> Iterator[None]:
    """Run every ``MeshLinear`` inside the block with ``engine`` (default: the ideal twin)."""
    token = _ENGINE.set(engine)
    try:
        yield
    finally:
        _ENGINE.reset(token)


class MeshLinear(nn.Module):
    """y = W x + b with W realized by tiles of MZI units; parameters are phases and gains."""

    def __init__(self, in_features: int, out_features: int, mesh_size: int) -> None:
        super().__init__()
        layout = MeshLayout(mesh_size)
        self.in_features, self.out_features, self.mesh_size = in_features, out_features, mesh_size
        self.num_rows = math.ceil(out_features / mesh_size)
        self.num_cols = math.ceil(in_features / mesh_size)
        tiles = self.num_rows * self.num_cols
        mesh = (tiles, layout.num_columns, layout.num_slots)
        modes = (tiles, mesh_size)
        shapes = (mesh, mesh, modes, modes, modes, mesh, mesh, modes)
        for name, shape in zip(PHASE_NAMES, shapes, strict=True):
            self.register_parameter(name, nn.Parameter(torch.zeros(shape)))
        self.gain = nn.Parameter(torch.ones(tiles))
        self.bias = nn.Parameter(torch.zeros(out_features))

    @property
    def num_tiles(self) -> int:
        return self.num_rows * self.num_cols

    @staticmethod
    def from_linear(linear: nn.Linear, mesh_size: int) -> MeshLinear:
        """Phases of the Clements/SVD decomposition of ``linear``'s weights (float32 storage)."""
        module = MeshLinear(linear.in_features, linear.out_features, mesh_size)
        stacked = stack_program(linear.weight.detach().to(torch.float64), mesh_size)
        with torch.no_grad():
            for name, value in stacked.items():
                getattr(module, name).copy_(value)
            if linear.bias is not None:
                module.bias.copy_(linear.bias.detach())
        return module

    def phases(self) -> list[Tensor]:
        return [getattr(self, name).to(torch.float64) for name in PHASE_NAMES]

    def forward(self, x: Tensor) -> Tensor:
        engine = _ENGINE.get() or ideal_apply
        y = engine(self, x.reshape(-1, x.shape[-1]).to(torch.float64))
        return (y.reshape(*x.shape[:-1], self.out_features) + self.bias).to(x.dtype)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"mesh_size={self.mesh_size}, tiles={self.num_rows}x{self.num_cols}"
        )


def stack_program(w_OI: Tensor, mesh_size: int) -> dict[str, Tensor]:
    """``MeshLinear`` parameter values (float64) that realize ``w_OI`` on an ideal mesh."""
    program = tile_matrix(w_OI, mesh_size)
    tiles = [tile for row in program.tiles for tile in row]
    stacked = {
        name: torch.stack([tile.phases.tensors()[index] for tile in tiles])
        for index, name in enumerate(PHASE_NAMES)
    }
    stacked["gain"] = torch.tensor([tile.gain for tile in tiles], dtype=torch.float64)
    return stacked


def convert_linears(module: nn.Module, mesh_size: int) -> nn.Module:
    """``module`` with every ``nn.Linear`` (itself or nested) replaced by a ``MeshLinear``."""
    if isinstance(module, nn.Linear):
        return MeshLinear.from_linear(module, mesh_size)
    for name, child in module.named_children():
        setattr(module, name, convert_linears(child, mesh_size))
    return module


# ---- The tiled optics -------------------------------------------------------------------


class Tiles:
    """The cores a node runs tiles on: tile t on core t % len(cores).

    Built from physical cores it is the hardware (hidden phase errors, per-MZI losses,
    detection noise, ADC); built from twin cores it is the ideal model.
    """

    def __init__(self, cores: list[PhotonicCore]) -> None:
        assert cores, "a node has at least one core"
        self.cores = cores
        self.nominal_transmission = cores[0].nominal_transmission

    def _groups(self, num_tiles: int) -> list[Tensor]:
        return [torch.arange(k, num_tiles, len(self.cores)) for k in range(len(self.cores))]

    def actual(self, commanded: list[Tensor]) -> list[Tensor]:
        """The phases the light sees for the commanded ``[T, ...]`` phases."""
        num_tiles = commanded[0].shape[0]
        groups = [g for g in self._groups(num_tiles) if len(g)]
        parts = [
            self.cores[k].actual_phases(UnitPhases.from_tensors([p[g] for p in commanded]))
            for k, g in enumerate(groups)
        ]
        order = torch.argsort(torch.cat(groups))
        return [
            torch.cat([part.tensors()[i] for part in parts])[order] for i in range(len(commanded))
        ]

    def amplitudes(self, num_tiles: int) -> list[Tensor] | None:
        per_core = [core.loss_amplitudes() for core in self.cores]
        if per_core[0] is None:
            return None
        return [
            torch.stack([per_core[t % len(self.cores)][i] for t in range(num_tiles)])
            for i in range(3)
        ]

    def couplers(self, num_tiles: int) -> list[Tensor] | None:
        """Per-MZI coupler splitting errors of each tile's core ([T, C, P, 2], [T, N, 2], ...)."""
        per_core = [core.coupler_errors() for core in self.cores]
        if per_core[0] is None:
            return None
        return [
            torch.stack([per_core[t % len(self.cores)][i] for t in range(num_tiles)])
            for i in range(3)
        ]

    def elements(self, phases: list[Tensor]) -> list[OpticalElement]:
        """The circuit the light sees for commanded ``[T, ...]`` phases on these cores."""
        num_tiles = phases[0].shape[0]
        return tile_elements(
            self.actual(phases), self.amplitudes(num_tiles), self.couplers(num_tiles)
        )

    def detect(self, field_BTN: Tensor) -> Tensor:
        # Every core's detectors are the same model; core 0's noise generator serves them all.
        return self.cores[0].detect(field_BTN)


def tile_elements(
    phases: list[Tensor],
    amplitudes: list[Tensor] | None,
    couplers: list[Tensor] | None = None,
) -> list[OpticalElement]:
    """The unit of every tile as one circuit acting on ``[B, T, N]`` fields."""
    num_modes = phases[2].shape[-1]
    layout = MeshLayout(num_modes)
    v_amp, atten_amp, u_amp = amplitudes if amplitudes is not None else (None, None, None)
    v_cpl, atten_cpl, u_cpl = couplers if couplers is not None else (None, None, None)
    elements: list[OpticalElement] = []

    def mesh(
        theta: Tensor, phi: Tensor, screen: Tensor, amp: Tensor | None, cpl: Tensor | None
    ) -> None:
        for c, num_pairs in enumerate(layout.pairs_per_column):
            column = MZIColumn(
                c % 2,
                theta[:, c, :num_pairs],
                phi[:, c, :num_pairs],
                None if amp is None else amp[:, c, :num_pairs],
                None if cpl is None else cpl[:, c, :num_pairs],
            )
            column.num_mode_dims = 2  # (tile, mode): gradients sum over the batch only
            elements.append(column)
        elements.append(PhaseScreen(screen))

    mesh(phases[0], phases[1], phases[2], v_amp, v_cpl)
    attenuators = Attenuators(phases[3], phases[4], atten_amp, atten_cpl)
    attenuators.num_mode_dims = 2
    elements.append(attenuators)
    mesh(phases[5], phases[6], phases[7], u_amp, u_cpl)
    return elements


def _encode(module: MeshLinear, x_BI: Tensor) -> tuple[Tensor, Tensor]:
    """Input fields of every tile ``[B, T, N]`` at modulator full scale, and the scale."""
    n = module.mesh_size
    scale_B1 = (
        x_BI.detach().abs().amax(dim=-1, keepdim=True).clamp(min=torch.finfo(torch.float64).tiny)
    )
    x = F.pad(x_BI / scale_B1, (0, module.num_cols * n - x_BI.shape[-1]))
    x = x.reshape(-1, 1, module.num_cols, n).expand(-1, module.num_rows, module.num_cols, n)
    return x.reshape(-1, module.num_tiles, n).to(torch.complex128), scale_B1


def _decode(module: MeshLinear, detected_BTN: Tensor, gain_T: Tensor, scale_B1: Tensor) -> Tensor:
    """Tile outputs times their gains, partial sums over tile columns, input scale undone."""
    n = module.mesh_size
    y = (detected_BTN * gain_T[:, None]).reshape(-1, module.num_rows, module.num_cols, n).sum(2)
    return y.reshape(-1, module.num_rows * n)[:, : module.out_features] * scale_B1


def run_tiles(
    module: MeshLinear, tiles: Tiles, x_BI: Tensor, phases: list[Tensor], gain_T: Tensor
) -> Tensor:
    """W x through ``tiles`` (in-phase quadrature, coherent detection); differentiable on a twin."""
    elements = tiles.elements(phases)
    field, scale = _encode(module, x_BI)
    detected = tiles.detect(propagate(elements, field)).real
    return _decode(module, detected, gain_T, scale)


_IDEAL = Tiles([PhotonicCore.Config(mesh_size=1).build(0)])


def ideal_apply(module: MeshLinear, x_BI: Tensor) -> Tensor:
    """The ideal twin: exact phases, lossless, noise-free; autograd gives the twin's gradients."""
    return run_tiles(module, _IDEAL, x_BI, module.phases(), module.gain.to(torch.float64))


class _FfmMatmul(torch.autograd.Function):
    """Physical forward; backward by fully forward mode on the same hardware (no twin).

    Gradients are w.r.t. the phases the light sees; the controller applies them to the
    commanded phases (the two differ by the heaters' small gain error and crosstalk).
    """

    @staticmethod
    def forward(ctx, module, tiles, x_BI, gain_T, *phases):
        elements = tiles.elements(list(phases))
        field, scale = _encode(module, x_BI)
        out, stored = ffm_forward(elements, field)
        detected = tiles.detect(out).real
        ctx.module, ctx.tiles, ctx.elements, ctx.stored = module, tiles, elements, stored
        ctx.save_for_backward(detected, scale, gain_T)
        ctx.phase_shapes = [p.shape for p in phases]
        return _decode(module, detected, gain_T, scale)

    @staticmethod
    def backward(ctx, grad_y_BO):
        detected, scale, gain_T = ctx.saved_tensors
        module: MeshLinear = ctx.module
        n = module.mesh_size
        g = F.pad(grad_y_BO, (0, module.num_rows * n - module.out_features))
        g = g.reshape(-1, module.num_rows, 1, n).expand(-1, module.num_rows, module.num_cols, n)
        g_BTN = g.reshape(-1, module.num_tiles, n) * scale[:, :, None]
        grad_gain = (g_BTN * detected).sum(dim=(0, 2))
        # y = gain s Re(E) / nominal, so dL/dE* = gain s dL/dy / (2 nominal) on every mode.
        error = (0.5 * g_BTN * gain_T[:, None] / ctx.tiles.nominal_transmission).to(
            torch.complex128
        )
        input_error, grads = ffm_backward(ctx.elements, ctx.stored, error)
        # The input field is x / s (real), so dL/dx = 2 Re(dL/dE_in*) / s, summed over tile rows.
        grad_x = 2.0 * input_error.real.reshape(-1, module.num_rows, module.num_cols, n).sum(1)
        grad_x = grad_x.reshape(-1, module.num_cols * n)[:, : module.in_features] / scale
        return None, None, grad_x, grad_gain, *assemble_gradients(ctx.phase_shapes, grads)


def ffm_apply(module: MeshLinear, tiles: Tiles, x_BI: Tensor) -> Tensor:
    return _FfmMatmul.apply(module, tiles, x_BI, module.gain.to(torch.float64), *module.phases())


def assemble_gradients(shapes: list[torch.Size], grads: list[tuple[Tensor, ...]]) -> list[Tensor]:
    """Per-element gradients (``tile_elements`` order) back into the ``[T, ...]`` phase layout."""
    num_columns = shapes[0][1]
    out = [torch.zeros(shape, dtype=torch.float64) for shape in shapes]

    def mesh(first: int, offset: int) -> None:
        for c in range(num_columns):
            g_theta, g_phi = grads[first + c]
            out[offset][:, c, : g_theta.shape[-1]] = g_theta
            out[offset + 1][:, c, : g_phi.shape[-1]] = g_phi
        (out[offset + 2][:],) = grads[first + num_columns]

    mesh(0, 0)
    out[3][:], out[4][:] = grads[num_columns + 1]
    mesh(num_columns + 2, 5)
    return out
