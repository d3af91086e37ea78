"""Direct feedback alignment: fixed random feedback, no weights in the update."""

from __future__ import annotations

import inspect
import math

import pytest
import torch

from nodes.photonic.dfa import DirectFeedbackAlignment


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_feedback_matrices_are_uniform_and_scaled_by_width():
    width, num_outputs = 400, 250
    (b,) = DirectFeedbackAlignment.Config().build([width], num_outputs, seed=0).feedback
    bound = 1 / math.sqrt(width)
    assert b.shape == (width, num_outputs)
    assert b.abs().max().item() <= bound
    n = b.numel()
    # Uniform on [-a, a): mean 0 (SE a/sqrt(3n)), variance a^2/3 (SE ~0.9 var/sqrt(n) = 0.2 %).
    assert b.mean().item() == pytest.approx(0.0, abs=5 * bound / math.sqrt(3 * n))
    assert b.var().item() == pytest.approx(bound**2 / 3, rel=0.015)


def test_update_rule_needs_no_weights():
    parameters = set(inspect.signature(DirectFeedbackAlignment.updates).parameters)
    assert parameters == {"self", "error_BO", "layer_inputs", "activation_derivatives"}


def test_updates_follow_the_dfa_formula():
    dfa = DirectFeedbackAlignment.Config().build([5], 3, seed=1)
    e = torch.randn(4, 3, generator=gen(2))
    x, h = torch.randn(4, 2, generator=gen(3)), torch.randn(4, 5, generator=gen(4))
    derivative = (torch.randn(4, 5, generator=gen(5)) > 0).float()
    (dw1, db1), (dw2, db2) = dfa.updates(e, [x, h], [derivative])
    delta1 = (e @ dfa.feedback[0].T) * derivative
    assert torch.allclose(dw1, delta1.T @ x / 4)
    assert torch.allclose(db1, delta1.mean(0))
    assert torch.allclose(dw2, e.T @ h / 4)  # the output layer gets e itself, as in backprop
    assert torch.allclose(db2, e.mean(0))


def test_projection_noise_has_the_configured_moments():
    config = DirectFeedbackAlignment.Config(noise=True, noise_mean=0.03, noise_std=0.618)
    dfa = config.build([50], 4, seed=0)
    e = torch.randn(4000, 4, generator=gen(1))
    noise = dfa.project(e)[0] - e @ dfa.feedback[0].T
    relative = noise / e.abs().amax(dim=-1, keepdim=True)
    n = relative.numel()
    assert relative.mean().item() == pytest.approx(0.03, abs=5 * 0.618 / math.sqrt(n))
    assert relative.std().item() == pytest.approx(0.618, rel=0.01)


def train(noise: bool, seed: int = 0, steps: int = 150) -> list[float]:
    g = gen(seed)
    x = torch.randn(256, 8, generator=g)
    y = (x[:, 0] > 0).long() + 2 * (x[:, 1] + x[:, 2] > 0).long()
    layers = [torch.nn.Linear(8, 32), torch.nn.Linear(32, 32), torch.nn.Linear(32, 4)]
    with torch.no_grad():
        for layer in layers:
            layer.weight.copy_(
                torch.randn(layer.weight.shape, generator=g) / math.sqrt(layer.in_features)
            )
            layer.bias.zero_()
    dfa = DirectFeedbackAlignment.Config(noise=noise).build([32, 32], 4, seed=seed)
    optimizer = torch.optim.SGD([p for layer in layers for p in layer.parameters()], lr=0.2)
    losses = []
    for _ in range(steps):
        with torch.no_grad():
            h, inputs, derivatives = x, [], []
            for layer in layers[:-1]:
                inputs.append(h)
                a = layer(h)
                derivatives.append((a > 0).float())
                h = torch.relu(a)
            inputs.append(h)
            logits = layers[-1](h)
            losses.append(torch.nn.functional.cross_entropy(logits, y).item())
            error = torch.softmax(logits, -1) - torch.nn.functional.one_hot(y, 4)
            for layer, (dw, db) in zip(
                layers, dfa.updates(error, inputs, derivatives), strict=True
            ):
                layer.weight.grad, layer.bias.grad = dw, db
        optimizer.step()
    return losses


@pytest.mark.parametrize("noise", [False, True])
def test_dfa_trains_a_small_mlp(noise):
    losses = train(noise)
    assert sum(losses[-10:]) / 10 < 0.75 * losses[0]


def test_dfa_is_seeded():
    assert train(True, steps=5) == train(True, steps=5)


def test_bad_shapes_are_rejected():
    with pytest.raises(ValueError, match="layer width 0"):
        DirectFeedbackAlignment.Config().build([0], 3, seed=0)
    dfa = DirectFeedbackAlignment.Config().build([5], 3, seed=0)
    with pytest.raises(ValueError, match="got 0 activation derivatives for 1 hidden layers"):
        dfa.deltas(torch.zeros(2, 3), [])
