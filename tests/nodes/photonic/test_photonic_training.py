"""Photonic training methods: each strategy on its own, and as the config resolves it."""

from __future__ import annotations

import math
import typing

import pytest
import torch
from torch import nn

from core.cost.engine import Tally
from core.cost.operation import Operation
from core.cost.workload import Matmul
from emulator.config import load_config
from memoryx.sparsity import Sparsity
from nodes.photonic.backend import PhotonicBackend
from nodes.photonic.cost import num_unit_shifters
from nodes.photonic.layer import MeshLinear
from nodes.photonic.training import (
    TRAINING_METHODS,
    Backprop,
    DirectFeedback,
    FullyForward,
    program_tiles,
)


def _engine(training: str, mesh_size: int = 8, num_cores: int = 3):
    overrides = {"backend.kind": "photonic", "backend.training": training}
    overrides |= {"backend.mesh_size": mesh_size, "backend.num_cores": num_cores}
    config = load_config(overrides=overrides)
    return config.backend.engine(config.emulated_hardware)


def _op(phase: str, *, is_last_layer: bool = False, has_input_gradient: bool = True) -> Operation:
    return Operation(
        layer="l1",
        layer_index=1,
        phase=phase,
        stream_in_bytes=0.0,
        flops_per_node=1e5,
        grad_out_bytes=0.0,
        samples=4.0,
        weight_flops_fraction=1.0,
        weight_density=1.0,
        matmuls=(Matmul(num_outputs=20, num_inputs=64, vectors_per_sample=1.0),),
        optical_passes=(),
        has_input_gradient=has_input_gradient,
        is_last_layer=is_last_layer,
        output_width=10,
    )


def _parts(training: str, op: Operation) -> set[str]:
    return set(_engine(training).op_cost(op, "fp32").time_by_part_s)


def test_every_configurable_name_has_exactly_one_method():
    choices = typing.get_args(typing.get_type_hints(PhotonicBackend.Config)["training"])
    assert set(choices) == set(TRAINING_METHODS)
    for name in choices:
        config = PhotonicBackend.Config.ideal(mesh_size=8, training=name)
        assert config.method.name == name
        assert config.build().method is config.method


def test_only_dfa_streams_no_weights_backward():
    for name, method in TRAINING_METHODS.items():
        config = PhotonicBackend.Config.ideal(mesh_size=8, training=name)
        assert config.needs_weights_in_backward == method.needs_weights_in_backward
        assert config.build().needs_weights_in_backward == method.needs_weights_in_backward
    assert [n for n, m in TRAINING_METHODS.items() if not m.needs_weights_in_backward] == ["dfa"]


def test_sparsity_is_refused_where_phases_train_and_allowed_for_dfa():
    sparsity = Sparsity.Config(sparsity=0.5)
    for method in (Backprop(), FullyForward()):
        method.check_sparsity(None)
        with pytest.raises(ValueError, match=rf"backend.training = '{method.name}' is not valid"):
            method.check_sparsity(sparsity)
    DirectFeedback().check_sparsity(sparsity)


def test_phase_methods_turn_linears_into_meshes_and_dfa_keeps_weights():
    layer = nn.Sequential(nn.Linear(16, 8), nn.ReLU())
    for method in (Backprop(), FullyForward()):
        prepared = method.prepare_layer(layer, 8)
        assert any(isinstance(m, MeshLinear) for m in prepared.modules()), method.name
    assert DirectFeedback().prepare_layer(layer, 8) is layer


def test_each_method_refuses_the_layers_it_cannot_train():
    norm = nn.Sequential(nn.Linear(16, 8), nn.LayerNorm(8))
    Backprop().check_layer(0, norm)  # autograd on the twin trains anything
    with pytest.raises(ValueError, match="training = 'ffm' has no forward-only gradient"):
        FullyForward().check_layer(0, FullyForward().prepare_layer(norm, 8))
    with pytest.raises(ValueError, match="training = 'dfa' needs every layer to be a Linear"):
        DirectFeedback().check_layer(0, norm)
    DirectFeedback().check_layer(0, nn.Sequential(nn.Linear(16, 8), nn.Tanh()))


def test_only_dfa_keeps_state_between_passes():
    assert Backprop().new_state() is None and FullyForward().new_state() is None
    first, second = DirectFeedback().new_state(), DirectFeedback().new_state()
    assert first is not second and first.last_layer == -1 and not first.pre_activations


def test_peak_flops_count_the_meshes_only_where_training_runs_on_them():
    digital = _engine("backprop").digital.config.flops_per_s
    assert _engine("backprop").peak_flops("fp32") == digital
    engine = _engine("ffm")
    optical = 3 * 2.0 * 8**2 * engine.cost.config.clock_hz
    assert engine.peak_flops("fp32") == optical + digital
    assert _engine("dfa").peak_flops("fp32") == engine.peak_flops("fp32")


def test_backprop_costs_only_digital_work():
    for phase in ("forward", "backward"):
        assert _parts("backprop", _op(phase)) == {"digital"}


def test_ffm_backward_reprograms_and_sends_the_conjugated_error():
    assert _parts("ffm", _op("forward")) == {"program", "mvm", "digital"}
    assert _parts("ffm", _op("backward")) == {"program", "mvm", "ffm_error", "digital"}


def test_dfa_backward_projects_the_error_in_hidden_layers_and_programs_nothing():
    assert _parts("dfa", _op("forward")) == {"program", "mvm", "digital"}
    assert _parts("dfa", _op("backward")) == {"dfa_projection", "digital"}
    assert _parts("dfa", _op("backward", is_last_layer=True)) == {"digital"}


@pytest.mark.parametrize(("num_tiles", "num_cores"), [(1, 1), (7, 3), (6, 3)])
def test_a_full_programming_sets_every_shifter_with_cores_in_parallel(num_tiles, num_cores):
    engine = _engine("ffm", num_cores=num_cores)
    c = engine.cost.config
    programming = program_tiles(engine.cost, 8, num_cores, num_tiles)
    assert programming.num_shifters == num_tiles * num_unit_shifters(8)
    assert programming.time_s == math.ceil(num_tiles / num_cores) * c.thermal_tuning_time_s
    assert programming.energy_j == pytest.approx(
        programming.num_shifters * c.heater_power_per_pi_w * c.thermal_tuning_time_s
    )
    # The engine's programming of a matrix is the same count.
    tally = Tally()
    engine.program(_matmul_work(8 * num_tiles, 8), tally)
    cost = tally.cost()
    assert cost.time_by_part_s["program"] == programming.time_s
    assert cost.energy_by_part_j["program"] == programming.energy_j


def _matmul_work(num_outputs: int, num_inputs: int):
    from core.cost.engine import MatmulWork

    return MatmulWork(num_outputs, num_inputs, 1)


def test_dfa_forward_counts_a_full_programming_of_its_weights():
    config = PhotonicBackend.Config.ideal(mesh_size=8, num_cores=3, training="dfa")
    backend = config.build()
    block = nn.Sequential(nn.Linear(16, 20), nn.ReLU())
    params = {name: p.detach() for name, p in block.named_parameters()}
    backend.forward(0, block, params, torch.randn(4, 16))
    expected = program_tiles(backend.cost, 8, 3, math.ceil(20 / 8) * math.ceil(16 / 8))
    stats = backend.stats()
    assert stats["photonic.program_time_s"] == expected.time_s
    assert stats["photonic.program_energy_j"] == expected.energy_j
    assert stats["photonic.shifters_changed"] == expected.num_shifters
