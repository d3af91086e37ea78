import time
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from core.data import BatchSampler, DataConfig
from emulator.reference import evaluate, reference_train, torch_optimizer
from emulator.zoo import ModelConfig, default_data_config


def optimizer_config(name="adam", **overrides):
    """Duck-typed stand-in for memoryx.optim.Optimizer.Config."""
    fields = dict(
        name=name, lr=1e-3, momentum=0.0, dampening=0.0, nesterov=False,
        weight_decay=0.0, beta1=0.9, beta2=0.999, eps=1e-8,
    )  # fmt: skip
    return SimpleNamespace(**(fields | overrides))


@pytest.fixture(scope="module")
def digits():
    return DataConfig(name="digits").build(seed=0)


@pytest.fixture
def one_thread():
    """Run torch on one thread so CPU time measures work, not contention.

    The machine is shared: with other jobs on its cores, wall time swings by
    20x and idle intra-op threads spin, but one thread's CPU time stays put.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_mlp_digits_reaches_90_percent_in_a_few_seconds(digits, one_thread):
    model = ModelConfig(name="mlp-digits").build(seed=0)
    cpu_start = time.process_time()
    result = reference_train(
        model,
        digits,
        optimizer_config=optimizer_config(lr=2e-3),
        batch_size=64,
        num_steps=200,
        seed=0,
    )
    cpu_seconds = time.process_time() - cpu_start
    metrics = evaluate(result.blocks, digits)
    assert metrics["test_accuracy"] >= 0.90
    assert metrics["test_loss"] < 0.5 < result.losses[0]
    assert len(result.losses) == len(result.step_times_s) == 200
    assert all(t > 0 for t in result.step_times_s)
    # Measured: ~0.5 s of one core, ~2 s when it is the process's first torch
    # work (lazy kernel set-up); 6 s fails a loop an order of magnitude slow.
    assert cpu_seconds < 6.0


def test_gpt_tiny_loss_goes_down():
    config = ModelConfig(name="gpt-tiny")
    data = default_data_config(config).build(seed=0)
    result = reference_train(
        config.build(seed=0), data, optimizer_config=optimizer_config(lr=3e-3), batch_size=32,
        num_steps=40, seed=0,
    )  # fmt: skip
    # Starts near log(64) = 4.16 nats; 40 Adam steps learn most of the unigram
    # and part of the bigram structure (the floor is the chain's ~1.06 nats).
    assert result.losses[0] == pytest.approx(4.16, abs=0.15)
    assert sum(result.losses[-5:]) / 5 < result.losses[0] - 1.0


def test_training_is_deterministic_and_leaves_the_input_model_alone(digits):
    model = ModelConfig(name="cnn-digits").build(seed=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    kwargs = dict(
        optimizer_config=optimizer_config("adamw", weight_decay=0.01),
        batch_size=32,
        num_steps=5,
        seed=3,
    )
    a = reference_train(model, digits, **kwargs)
    b = reference_train(list(model), digits, **kwargs)
    assert a.losses == b.losses
    for weights_a, weights_b in zip(a.block_weights, b.block_weights, strict=True):
        assert weights_a.keys() == weights_b.keys()
        assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)
    assert all(torch.equal(model.state_dict()[k], before[k]) for k in before)
    assert not torch.equal(a.block_weights[0]["1.weight"], before["0.1.weight"])


def test_one_sgd_step_is_plain_gradient_descent_on_the_global_batch_mean(digits):
    torch.manual_seed(0)
    linear = nn.Linear(64, 10)
    lr = 0.5
    result = reference_train(
        [linear],
        digits,
        optimizer_config=optimizer_config("sgd", lr=lr),
        batch_size=16,
        num_steps=1,
        seed=4,
    )
    indices = BatchSampler(digits.num_train, 16, seed=4).global_batch(0)
    loss = F.cross_entropy(linear(digits.train_inputs[indices]), digits.train_targets[indices])
    loss.backward()
    assert result.losses[0] == pytest.approx(loss.item(), abs=1e-6)
    torch.testing.assert_close(
        result.block_weights[0]["weight"], linear.weight - lr * linear.weight.grad
    )
    torch.testing.assert_close(result.block_weights[0]["bias"], linear.bias - lr * linear.bias.grad)


def test_torch_optimizer_maps_every_field():
    params = [nn.Parameter(torch.zeros(3))]
    sgd = torch_optimizer(
        optimizer_config(
            "sgd", lr=0.1, momentum=0.9, dampening=0.0, nesterov=True, weight_decay=1e-4
        ),
        params,
    )
    assert isinstance(sgd, torch.optim.SGD)
    group = sgd.param_groups[0]
    assert (group["lr"], group["momentum"], group["nesterov"], group["weight_decay"]) == (
        0.1,
        0.9,
        True,
        1e-4,
    )
    assert group["foreach"] is False
    for name, cls in (("adam", torch.optim.Adam), ("adamw", torch.optim.AdamW)):
        optimizer = torch_optimizer(
            optimizer_config(name, lr=2e-3, beta1=0.8, beta2=0.95, eps=1e-6, weight_decay=0.1),
            params,
        )
        group = optimizer.param_groups[0]
        assert type(optimizer) is cls
        assert (group["lr"], group["betas"], group["eps"], group["weight_decay"]) == (
            2e-3,
            (0.8, 0.95),
            1e-6,
            0.1,
        )
        assert group["foreach"] is False


def test_torch_optimizer_rejects_unknown_names():
    with pytest.raises(ValueError, match="name = 'lamb' is not valid"):
        torch_optimizer(optimizer_config("lamb"), [nn.Parameter(torch.zeros(1))])


def test_evaluate_matches_a_direct_computation_and_restores_modes(digits):
    model = ModelConfig(name="mlp-digits").build(seed=2)
    model.train()
    metrics = evaluate(model, digits, batch_size=100)
    with torch.no_grad():
        logits = model(digits.test_inputs)
    assert metrics["test_loss"] == pytest.approx(
        F.cross_entropy(logits, digits.test_targets).item(), rel=1e-5
    )
    expected_accuracy = (logits.argmax(1) == digits.test_targets).float().mean().item()
    assert metrics["test_accuracy"] == pytest.approx(expected_accuracy)
    assert all(module.training for module in model.modules())


def test_reference_train_rejects_negative_steps(digits):
    with pytest.raises(ValueError, match="num_steps = -1"):
        reference_train(
            [nn.Linear(64, 10)],
            digits,
            optimizer_config=optimizer_config(),
            batch_size=8,
            num_steps=-1,
            seed=0,
        )
