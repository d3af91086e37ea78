"""The photonic compute-node backend: mesh layers, backprop on the twin, FFM, DFA, config errors."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from emulator.config import load_config
from nodes.backend import autograd_backward, call_block
from nodes.photonic.backend import PhotonicBackend
from nodes.photonic.device import PhotonicCore
from nodes.photonic.layer import MeshLinear, Tiles, run_tiles, use_engine
from nodes.photonic.nonideal import InsertionLoss, PhaseError

MESH = 8


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # many tiny ops: threads only add overhead on this machine
    yield
    torch.set_num_threads(threads)


def _linear_block(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 10), nn.ReLU())


def _mesh_block(config: PhotonicBackend.Config, seed: int = 0):
    (block,) = config.build().prepare_layers([_linear_block(seed)])
    params = {n: p.detach().clone() for n, p in block.named_parameters()}
    return block, params, torch.randn(5, 12)


def _noise_free_physical(**overrides) -> PhotonicBackend.Config:
    """Hidden phase errors and lossy MZIs, but exact readout: gradients are deterministic."""
    device = PhotonicCore.Config(
        mesh_size=MESH,
        phase_error=PhaseError.Config(sigma_rad=0.2),
        insertion_loss=InsertionLoss.Config(loss_db=0.2, sigma_db=0.02),
    )
    return PhotonicBackend.Config(mesh_size=MESH, device=device, **overrides)


def test_mesh_linear_reproduces_the_linear_layer_on_the_twin():
    linear = _linear_block()[0]
    mesh = MeshLinear.from_linear(linear, MESH)
    assert mesh.num_tiles == 2 * 2  # 10 x 12 on 8-mode meshes
    x = torch.randn(7, 12)
    torch.testing.assert_close(mesh(x), linear(x), atol=1e-5, rtol=1e-5)


def test_forward_and_backward_shapes_for_every_training_method():
    for training in ("backprop", "ffm", "dfa"):
        config = PhotonicBackend.Config(mesh_size=MESH, training=training)
        block, params, x = _mesh_block(config)
        backend = config.build()
        backend.forward(1, block, params, x)  # layer 1 is the last layer seen: DFA delta = e
        y = backend.forward(1, block, params, x)
        assert y.shape == (5, 10) and y.dtype == torch.float32
        needed = params if backend.needs_weights_in_backward else {}
        grad_x, grads = backend.backward(1, block, needed, x, torch.randn_like(y))
        assert set(grads) == set(params)
        for name, grad in grads.items():
            assert grad.shape == params[name].shape and grad.dtype == torch.float32
        assert grad_x.shape == (x.shape if training != "dfa" else y.shape)


def test_backprop_gradients_are_autograd_on_the_twin_and_eval_runs_on_the_hardware():
    config = PhotonicBackend.Config(mesh_size=MESH, training="backprop")
    block, params, x = _mesh_block(config)
    backend = config.build()
    grad_y = torch.randn(5, 10)
    grad_x, grads = backend.backward(0, block, params, x, grad_y)
    want_x, want = autograd_backward(call_block, block, params, x, grad_y)  # ideal mesh model
    torch.testing.assert_close(grad_x, want_x)
    for name in params:
        torch.testing.assert_close(grads[name], want[name])
    # The twin computes exactly W: its input gradient is that of the original Linear.
    linear = _linear_block()
    x_in = x.clone().requires_grad_()
    linear(x_in).backward(grad_y)
    torch.testing.assert_close(grad_x, x_in.grad, atol=1e-5, rtol=1e-4)
    # Training forward on the twin equals the digital layer; evaluation is the physical node.
    y_train = backend.forward(0, block, params, x)
    torch.testing.assert_close(y_train, linear(x).detach(), atol=1e-5, rtol=1e-5)
    block.eval()
    y_deployed = backend.forward(0, block, params, x)
    assert (y_deployed - y_train).abs().max() > 1e-2
    assert backend.stats()["photonic.programmings"] == 1


def test_ffm_gradients_equal_autograd_of_the_physical_model():
    config = _noise_free_physical(training="ffm")
    block, params, x = _mesh_block(config)
    backend = config.build()
    grad_y = torch.randn(5, 10)
    grad_x, grads = backend.backward(0, block, params, x, grad_y)

    # Reference: autograd through the same physical cores (phase offsets and losses included).
    tiles = Tiles([config.device.build(config.seed)])

    def physical(module, x_BI):
        return run_tiles(module, tiles, x_BI, module.phases(), module.gain.double())

    def run(b, p, xi):
        with use_engine(physical):
            return call_block(b, p, xi)

    want_x, want = autograd_backward(run, block, params, x, grad_y)
    torch.testing.assert_close(grad_x, want_x, atol=1e-6, rtol=1e-5)
    for name in params:
        torch.testing.assert_close(grads[name], want[name], atol=1e-6, rtol=1e-5)
    # ... and they are not the twin's gradients: the hidden errors matter.
    _twin_x, twin = autograd_backward(call_block, block, params, x, grad_y)
    assert not torch.allclose(grads["0.u_theta"], twin["0.u_theta"], atol=1e-3)


def test_ffm_forward_runs_on_the_physical_node_and_counts_programming():
    config = _noise_free_physical(training="ffm")
    block, params, x = _mesh_block(config)
    backend = config.build()
    y = backend.forward(0, block, params, x)
    assert (y - _linear_block()(x)).abs().max() > 1e-2
    stats = backend.stats()
    assert stats["photonic.programmings"] == 1
    assert stats["photonic.program_time_s"] == pytest.approx(
        4 * config.device.cost.thermal_tuning_time_s  # four tiles on one core
    )
    assert stats["photonic.program_energy_j"] > 0 and stats["photonic.mvm_energy_j"] > 0
    assert stats["photonic.mvm_vectors"] == 4 * 5
    backend.forward(0, block, params, x)
    # Streaming: the single core holds the last tile, so every pass reprograms the tiles.
    assert backend.stats()["photonic.program_time_s"] == pytest.approx(
        2 * stats["photonic.program_time_s"]
    )


def test_dfa_needs_no_weights_and_follows_the_feedback_rule():
    config = PhotonicBackend.Config(mesh_size=MESH, training="dfa")
    backend = config.build()
    assert not backend.needs_weights_in_backward
    torch.manual_seed(0)
    hidden, head = nn.Sequential(nn.Linear(12, 6), nn.Tanh()), nn.Linear(6, 3)
    layers = backend.prepare_layers([hidden, head])
    assert layers[0] is hidden  # DFA keeps digital weights
    params = [{n: p.detach().clone() for n, p in layer.named_parameters()} for layer in layers]
    x = torch.randn(4, 12)
    h = backend.forward(0, hidden, params[0], x)
    logits = backend.forward(1, head, params[1], h)
    e = torch.randn_like(logits)
    e_out, head_grads = backend.backward(1, head, {}, h, e)
    assert torch.equal(e_out, e)  # the last layer hands the output error down unchanged
    torch.testing.assert_close(head_grads["weight"], e.T @ h)
    e_down, grads = backend.backward(0, hidden, {}, x, e_out)
    assert torch.equal(e_down, e)
    b = backend.method_state.feedback[0].feedback[0]
    a = x @ params[0]["0.weight"].T + params[0]["0.bias"]
    delta = (e @ b.T) * (1 - torch.tanh(a) ** 2)
    torch.testing.assert_close(grads["0.weight"], delta.T @ x, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grads["0.bias"], delta.sum(0), atol=1e-5, rtol=1e-5)


def test_dfa_refuses_layers_it_cannot_train():
    backend = PhotonicBackend.Config(training="dfa").build()
    conv = nn.Sequential(nn.Unflatten(1, (1, 8, 8)), nn.Conv2d(1, 2, 3))
    with pytest.raises(
        ValueError, match=r"training = 'dfa' needs every layer to be a Linear.*layer 0"
    ):
        backend.prepare_layers([conv])


def test_ffm_refuses_layers_without_a_forward_only_gradient():
    backend = PhotonicBackend.Config(mesh_size=MESH, training="ffm").build()
    with pytest.raises(ValueError, match=r"training = 'ffm' has no forward-only gradient .*Conv2d"):
        backend.prepare_layers([nn.Linear(4, 4), nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten())])
    with pytest.raises(ValueError, match=r"LayerNorm"):
        backend.prepare_layers([nn.Sequential(nn.LayerNorm(4), nn.Linear(4, 4))])


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"mesh_size": 0}, r"^backend\.mesh_size = 0 is not valid"),
        ({"mesh_size": -3}, r"^backend\.mesh_size = -3 is not valid"),
        ({"num_cores": 0}, r"^backend\.num_cores = 0 is not valid"),
        ({"device": {"phase_quantization": {"bits": 0}}}, r"phase_bits = 0 is not valid"),
        ({"device": {"insertion_loss": {"loss_db": -0.5}}}, r"loss_db = -0\.5 is not valid"),
        ({"training": "sgd"}, r"^backend\.training = 'sgd' is not valid; choose one of"),
    ],
)
def test_config_errors_name_the_field(raw, message):
    with pytest.raises(ValueError, match=message):
        load_config(overrides={"backend": {"kind": "photonic", **raw}})


def test_training_key_belongs_to_the_photonic_backend():
    config = load_config(overrides={"backend.kind": "photonic", "backend.training": "ffm"})
    assert config.backend.training == "ffm"
    with pytest.raises(ValueError, match=r"Unknown config key backend\.training"):
        load_config(overrides={"backend.training": "ffm"})


def test_defaults_are_the_realistic_preset_and_twin_has_no_errors():
    from nodes.photonic.preset import load_preset

    config = PhotonicBackend.Config()
    assert config.device == load_preset()
    twin = config.twin().device
    assert twin.phase_error is None and twin.insertion_loss is None and twin.mesh_size == 64


def test_a_replacement_node_has_the_lost_nodes_fabrication_errors():
    # A lost node is replaced by a backend built from the same config: its hidden errors come
    # from backend.seed alone, not from the process or what the node ran before.
    config = _noise_free_physical(training="ffm")
    block, params, x = _mesh_block(config)
    lost = config.build()
    lost.forward(0, block, params, x)
    want = lost.forward(0, block, params, x)
    assert (want - _linear_block()(x)).abs().max() > 1e-2  # the errors are there
    assert torch.equal(config.build().forward(0, block, params, x), want)
    other_chip = dataclasses.replace(config, seed=config.seed + 1).build()
    assert not torch.equal(other_chip.forward(0, block, params, x), want)
