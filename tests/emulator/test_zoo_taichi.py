"""The taichi-digits zoo models stream, train on a node, and run on the photonic backend."""

from __future__ import annotations

import math

import pytest
import torch

from emulator.config import load_config
from emulator.prepare import prepare_layers
from nodes.photonic.multipath import EmbeddingStage, EncoderStage
from nodes.worker import NodeWorker
from proto.serde import dtype_name


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # many small complex ops: threads only add overhead on 2 cores
    yield
    torch.set_num_threads(threads)


def config_for(name: str, backend: dict | None = None, batch_size: int = 64):
    overrides = {"model": {"name": name}, "num_nodes": 1, "batch_size": batch_size}
    return load_config(overrides=overrides | ({"backend": backend} if backend else {}))


class Node:
    """One node in-process, with MemoryX's job (hold the weights, apply AdamW) done here."""

    def __init__(self, config, lr: float = 0.01) -> None:
        layers, dataset = prepare_layers(config)
        self.weights = [
            {n: p.detach().clone() for n, p in layer.named_parameters()} for layer in layers
        ]
        self.optimizer = torch.optim.AdamW(
            [t for w in self.weights for t in w.values()], lr=lr, weight_decay=0.0
        )
        self.worker = NodeWorker(
            rank=0,
            num_nodes=1,
            layers=layers,
            dataset=dataset,
            batch_size=config.batch_size,
            seed=config.seed,
            backend=config.backend.build(),
            max_eval_samples=240,
        )

    def gradients(self, step: int) -> list[dict[str, torch.Tensor]]:
        for index, params in enumerate(self.weights):
            self.worker.forward(index, step, params)
        grads = [{}] * len(self.weights)
        for index in reversed(range(len(self.weights))):
            grads[index], _ = self.worker.backward(index, step, self.weights[index])
        return grads

    def train_step(self, step: int) -> None:
        for weights, grads in zip(self.weights, self.gradients(step), strict=True):
            for name, tensor in weights.items():
                tensor.grad = grads[name]
        self.optimizer.step()

    def eval_loss(self) -> tuple[float, float]:
        for index, params in enumerate(self.weights):
            result = self.worker.evaluate(index, 0, params)
        return result.loss_sum / result.num_targets, result.num_correct / result.num_targets


@pytest.mark.parametrize(("name", "num_layers"), [("taichi-digits", 3), ("taichi-digits-fixed", 2)])
def test_layers_stream_float32_phases(name, num_layers):
    layers, _ = prepare_layers(config_for(name))
    assert len(layers) == num_layers
    for layer in layers:
        params = list(layer.parameters())
        assert params and all(p.dtype == torch.float32 for p in params)
        assert {dtype_name(p.dtype) for p in params} == {"float32"}  # what the wire accepts


def test_fixed_encoder_streams_no_encoder_masks():
    layers, _ = prepare_layers(config_for("taichi-digits-fixed"))
    encoder, embedding = layers[0]  # parameter-free encoder folded into the embedding's layer
    assert isinstance(encoder, EncoderStage) and isinstance(embedding, EmbeddingStage)
    assert not list(encoder.parameters())
    trained, _ = prepare_layers(config_for("taichi-digits"))
    assert sum(p.numel() for p in trained[0].parameters()) == 20 * 24 * 24


def test_a_few_node_steps_reduce_the_eval_loss():
    node = Node(config_for("taichi-digits"))
    before, _ = node.eval_loss()
    for step in range(6):
        node.train_step(step)
    after, accuracy = node.eval_loss()
    assert after < 0.5 * before
    assert accuracy > 0.4  # chance is 0.1


def test_photonic_backprop_trains_the_twin_and_evaluates_on_the_device():
    cs2 = Node(config_for("taichi-digits-fixed"))
    photonic = Node(config_for("taichi-digits-fixed", {"kind": "photonic", "mesh_size": 8}))
    twin_grads, grads = cs2.gradients(0), photonic.gradients(0)
    for twin, got in zip(twin_grads, grads, strict=True):
        for name, grad in got.items():
            torch.testing.assert_close(grad, twin[name], atol=1e-5, rtol=1e-4)
            assert grad.abs().max() > 0, name
    # Same weights: the physical node's phase errors, loss and noise change what it computes.
    physical_loss, _ = photonic.eval_loss()
    assert math.isfinite(physical_loss)
    assert physical_loss != pytest.approx(cs2.eval_loss()[0], rel=1e-3)


def test_ffm_measures_the_phase_gradients_on_the_device():
    backend = {"kind": "photonic", "training": "ffm", "mesh_size": 8}
    twin, node = (
        Node(config_for("taichi-digits-fixed")),
        Node(config_for("taichi-digits-fixed", backend)),
    )
    for twin_grad, grad in zip(twin.gradients(0), node.gradients(0), strict=True):
        for name, value in grad.items():
            assert torch.isfinite(value).all() and value.abs().max() > 0, name
            assert not torch.allclose(value, twin_grad[name], atol=1e-4), name


def test_dfa_refuses_the_optical_stages():
    with pytest.raises(ValueError, match="training = 'dfa' cannot train layer 0's EncoderStage"):
        prepare_layers(config_for("taichi-digits", {"kind": "photonic", "training": "dfa"}))
