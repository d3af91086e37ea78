"""PCM operating modes and hardware-aware passes: each strategy on its own, and as configured."""

from __future__ import annotations

import typing

import pytest
import torch

from core.cost.engine import MatmulWork, Tally
from core.cost.operation import Operation
from core.cost.workload import Matmul
from emulator.config import load_config
from nodes.pcm.analog import WeightStationary, analog_matmul, program_layer
from nodes.pcm.backend import PcmBackend
from nodes.pcm.device import PcmDevice
from nodes.pcm.modes import (
    BACKWARD_PASSES,
    FORWARD_PASSES,
    OPERATING_MODES,
    AnalogBackward,
    AnalogForward,
    HardwareAware,
    IdealBackward,
    IdealForward,
    Streaming,
    WeightStationaryMode,
)
from nodes.pcm.periphery import Periphery
from nodes.pcm.tile import Tile
from tests.nodes.replay import replay, summed

TILE = Tile.Config(rows=8, cols=8)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _programmed(w_OI: torch.Tensor, seed: int = 0):
    return program_layer(
        w_OI, None, TILE.build(), PcmDevice.Config().build(), Periphery.Config().build(), _gen(seed)
    )


def _placement(num_chips: int = 1, cores_per_chip: int = 4) -> WeightStationary:
    config = WeightStationary.Config(num_chips=num_chips, cores_per_chip=cores_per_chip)
    return config.build(TILE.build())


def _choices(config_class, field: str) -> set[str]:
    return set(typing.get_args(typing.get_type_hints(config_class)[field]))


# ---- The configs resolve every YAML name, and only those -------------------------------


def test_every_configurable_name_has_exactly_one_strategy():
    assert _choices(PcmBackend.Config, "mode") == set(OPERATING_MODES)
    assert _choices(HardwareAware.Config, "forward") == set(FORWARD_PASSES)
    assert _choices(HardwareAware.Config, "backward") == set(BACKWARD_PASSES)
    for name in OPERATING_MODES:
        assert PcmBackend.Config(mode=name).operating_mode.name == name
    for name in FORWARD_PASSES:
        assert HardwareAware.Config(forward=name).forward_pass.name == name
    for name in BACKWARD_PASSES:
        assert HardwareAware.Config(backward=name).backward_pass.name == name


# ---- Operating modes --------------------------------------------------------------------


def test_streaming_never_finds_a_layer_resident_and_rewrites_every_device():
    mode = Streaming()
    w_OI = torch.randn(8, 8, generator=_gen())
    held = _programmed(w_OI)
    assert mode.resident(held, w_OI, TILE.build(), PcmDevice.Config().build()) is None
    assert mode.overwritten(held) is None
    assert mode.reprograms_for_backward
    # One layer at a time: any model fits, however few arrays.
    mode.check_fit(_placement(cores_per_chip=1), [(1000, 1000)] * 10)
    mode.admit(_placement(cores_per_chip=1), [(1000, 1000)], (1000, 1000), first_time=True)


def test_weight_stationary_keeps_unchanged_weights_and_rewrites_changed_ones():
    mode = WeightStationaryMode()
    tile, device = TILE.build(), PcmDevice.Config().build()
    w_OI = torch.randn(8, 8, generator=_gen())
    held = _programmed(w_OI)
    assert mode.resident(held, w_OI.clone(), tile, device) is held
    assert mode.resident(held, w_OI + 0.5, tile, device) is None
    assert mode.resident(None, w_OI, tile, device) is None
    # Wear counts only the devices whose target changed: the previous targets are kept.
    assert mode.overwritten(held) is held.g_target_SRCIO
    assert mode.overwritten(None) is None
    assert not mode.reprograms_for_backward


def test_weight_stationary_refuses_a_model_that_does_not_fit_with_the_numbers():
    mode = WeightStationaryMode()
    placement = _placement(num_chips=1, cores_per_chip=4)  # 4 arrays of 8x8
    mode.check_fit(placement, [(8, 8), (8, 16)])  # 1 + 2 arrays
    with pytest.raises(
        ValueError, match=r"needs 5 arrays .* = 4 arrays; raise num_chips to at least 2"
    ):
        mode.check_fit(placement, [(8, 8), (16, 16)])
    # A new matrix must fit beside the resident ones; a re-programmed one is already placed.
    with pytest.raises(ValueError, match="needs 5 arrays"):
        mode.admit(placement, [(8, 8), (8, 16)], (16, 8), first_time=True)
    mode.admit(placement, [(8, 8), (8, 16), (8, 8), (8, 8)], (8, 8), first_time=False)


# ---- Forward passes ---------------------------------------------------------------------


def test_ideal_forward_is_the_exact_product_and_reads_no_compensation():
    w_OI = torch.randn(8, 16, generator=_gen(), dtype=torch.float64)
    x_BI = torch.randn(5, 16, generator=_gen(1), dtype=torch.float64)

    def no_scale():
        raise AssertionError("the ideal forward needs no drift compensation")

    y = IdealForward().read(
        x_BI, w_OI, _programmed(w_OI), 0.0, Periphery.Config().build(), _gen(), no_scale
    )
    assert torch.equal(y, x_BI @ w_OI.T)


def test_analog_forward_is_the_array_read_with_the_compensation_factor():
    w_OI = torch.randn(8, 16, generator=_gen())
    x_BI = torch.randn(64, 16, generator=_gen(1))
    programmed, periphery = _programmed(w_OI), Periphery.Config().build()
    scale = torch.tensor(1.25)
    y = AnalogForward().read(x_BI, w_OI, programmed, 10.0, periphery, _gen(3), lambda: scale)
    assert torch.equal(y, analog_matmul(x_BI, programmed, 10.0, periphery, _gen(3), scale))
    # Statistically: the read is the product up to device and converter noise, not exactly.
    error = (y - x_BI @ w_OI.T).norm() / (x_BI @ w_OI.T).norm()
    assert 0 < error < 0.5


# ---- Backward passes --------------------------------------------------------------------


def test_ideal_backward_gradient_is_exact_and_programs_nothing():
    w_OI = torch.randn(8, 16, generator=_gen())
    grad_BO = torch.randn(4, 8, generator=_gen(1))
    assert torch.equal(IdealBackward().input_gradient(grad_BO, w_OI, ()), grad_BO @ w_OI)
    assert IdealBackward().programmings(Streaming()) == 0
    assert IdealBackward().programmings(WeightStationaryMode()) == 0


def test_analog_backward_reprograms_only_where_the_arrays_are_shared():
    assert AnalogBackward().programmings(Streaming()) == 1
    assert AnalogBackward().programmings(WeightStationaryMode()) == 0


def _backward_op(has_input_gradient: bool) -> Operation:
    return Operation(
        layer="l1",
        layer_index=1,
        phase="backward",
        stream_in_bytes=0.0,
        flops_per_node=1e6,
        grad_out_bytes=0.0,
        samples=4.0,
        weight_flops_fraction=1.0,
        weight_density=1.0,
        matmuls=(Matmul(num_outputs=64, num_inputs=300, vectors_per_sample=1.0),),
        optical_passes=(),
        has_input_gradient=has_input_gradient,
        is_last_layer=False,
        output_width=10,
    )


def _engine(mode: str, backward: str):
    overrides = {"backend.kind": "pcm", "backend.mode": mode}
    overrides |= {"backend.training.backward": backward, "backend.weight_stationary.num_chips": 4}
    config = load_config(overrides=overrides)
    return config.backend.engine(config.emulated_hardware)


@pytest.mark.parametrize("mode", ["streaming", "weight-stationary"])
@pytest.mark.parametrize("has_input_gradient", [True, False])
def test_backward_costs_follow_the_pass_and_the_mode(mode, has_input_gradient):
    op = _backward_op(has_input_gradient)
    ideal = _engine(mode, "ideal").op_cost(op, "fp32")
    assert set(ideal.time_by_part_s) == {"digital"}
    analog = _engine(mode, "analog").op_cost(op, "fp32")
    parts = {"mvm_recompute", "digital"}
    parts |= {"mvm_transposed"} if has_input_gradient else set()
    parts |= {"program", "calibration"} if mode == "streaming" else set()
    assert set(analog.time_by_part_s) == parts


@pytest.mark.parametrize(
    ("mode", "backward", "programmings"),
    [
        ("streaming", "ideal", 1),
        ("streaming", "analog", 2),
        ("weight-stationary", "ideal", 1),
        ("weight-stationary", "analog", 1),
    ],
)
def test_write_cycles_per_step_count_each_programming(mode, backward, programmings):
    engine = _engine(mode, backward)
    assert (
        engine.write_cycles_per_step == programmings * engine.backend.cost.program_verify_iterations
    )


def test_engine_program_charges_programming_and_the_compensation_baseline():
    engine, tally = _engine("streaming", "ideal"), Tally()
    engine.program(MatmulWork(64, 300, 1), tally)
    assert set(tally.cost().time_by_part_s) == {"program", "calibration"}


def test_weight_stationary_analog_backward_engine_equals_the_node_counters():
    overrides = {"backend.kind": "pcm", "model.name": "mlp-digits", "num_nodes": 1}
    overrides |= {"batch_size": 16, "backend.mode": "weight-stationary"}
    overrides |= {"backend.training.backward": "analog", "backend.weight_stationary.num_chips": 4}
    counters, costs = replay(load_config(overrides=overrides))
    for part in ("program", "calibration", "mvm", "mvm_recompute", "mvm_transposed"):
        time_s, energy_j = summed(costs, part)
        assert time_s == pytest.approx(counters[f"pcm.{part}_time_s"], rel=1e-9), part
        assert energy_j == pytest.approx(counters[f"pcm.{part}_energy_j"], rel=1e-9), part
    # The arrays still hold each layer: its backward programs nothing.
    assert "program" not in {p for c in costs[len(costs) // 2 :] for p in c.time_by_part_s}
