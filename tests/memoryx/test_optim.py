"""MemoryX optimizers against torch.optim (single-tensor path), bit for bit."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from core.config import field_docs, from_dict
from memoryx.optim import OPTIMIZERS, SGD, Adam, AdamW, Optimizer

NUM_STEPS = 50
SHAPE = (7, 5)

# (our config, torch optimizer class, torch kwargs) for the same update rule.
CASES = {
    "sgd_plain": (
        dict(name="sgd", lr=0.05, momentum=0.0),
        torch.optim.SGD,
        dict(lr=0.05, momentum=0.0),
    ),
    "sgd_momentum": (
        dict(name="sgd", lr=0.05, momentum=0.9),
        torch.optim.SGD,
        dict(lr=0.05, momentum=0.9),
    ),
    "sgd_nesterov": (
        dict(name="sgd", lr=0.05, momentum=0.8, nesterov=True),
        torch.optim.SGD,
        dict(lr=0.05, momentum=0.8, nesterov=True),
    ),
    "sgd_weight_decay": (
        dict(name="sgd", lr=0.05, momentum=0.9, weight_decay=0.01),
        torch.optim.SGD,
        dict(lr=0.05, momentum=0.9, weight_decay=0.01),
    ),
    "sgd_dampening": (
        dict(name="sgd", lr=0.05, momentum=0.9, dampening=0.3),
        torch.optim.SGD,
        dict(lr=0.05, momentum=0.9, dampening=0.3),
    ),
    "sgd_wd_no_momentum": (
        dict(name="sgd", lr=0.05, momentum=0.0, weight_decay=0.1),
        torch.optim.SGD,
        dict(lr=0.05, momentum=0.0, weight_decay=0.1),
    ),
    "adam": (
        dict(name="adam", lr=1e-2),
        torch.optim.Adam,
        dict(lr=1e-2),
    ),
    "adam_weight_decay": (
        dict(name="adam", lr=1e-2, weight_decay=0.05, beta1=0.8, beta2=0.99, eps=1e-6),
        torch.optim.Adam,
        dict(lr=1e-2, weight_decay=0.05, betas=(0.8, 0.99), eps=1e-6),
    ),
    "adamw": (
        dict(name="adamw", lr=1e-2, weight_decay=0.1),
        torch.optim.AdamW,
        dict(lr=1e-2, weight_decay=0.1),
    ),
    "adamw_no_decay": (
        dict(name="adamw", lr=3e-3),
        torch.optim.AdamW,
        dict(lr=3e-3, weight_decay=0.0),
    ),
}

# Our state key -> torch's state key: the same names, by design.
STATE_KEYS = {"momentum_buffer", "exp_avg", "exp_avg_sq"}


def _gradients(seed: int, scale: float = 1.0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [scale * torch.randn(SHAPE, generator=gen) for _ in range(NUM_STEPS)]


def _run_ours(optimizer: Optimizer, param0: torch.Tensor, grads, mask=None):
    param = param0.clone()
    state = optimizer.init_state(param)
    for step, grad in enumerate(grads, start=1):
        optimizer.update(param, grad, state, step, mask=mask)
    return param, state


def _run_torch(torch_cls, kwargs, param0: torch.Tensor, grads):
    param = torch.nn.Parameter(param0.clone())
    opt = torch_cls([param], foreach=False, **kwargs)
    for grad in grads:
        param.grad = grad.clone()
        opt.step()
    return param.detach(), opt.state[param]


@pytest.mark.parametrize("case", sorted(CASES))
def test_update_is_bitwise_equal_to_torch_optim(case: str) -> None:
    ours_kwargs, torch_cls, torch_kwargs = CASES[case]
    param0 = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    # Gradients of scale 1e-3 keep Adam's denominator sensitive to eps, so that its
    # placement in the op order is checked too.
    grads = _gradients(1) + _gradients(2, scale=1e-3)
    optimizer = Optimizer.Config(**ours_kwargs).build()

    ours, our_state = _run_ours(optimizer, param0, grads)
    ref, ref_state = _run_torch(torch_cls, torch_kwargs, param0, grads)

    assert not torch.equal(ours, param0)
    assert torch.equal(ours, ref), f"max abs diff {(ours - ref).abs().max().item()}"
    assert set(our_state) == STATE_KEYS & set(ref_state)
    for key, tensor in our_state.items():
        assert torch.equal(tensor, ref_state[key]), key


@pytest.mark.parametrize("case", sorted(CASES))
def test_update_leaves_gradient_untouched(case: str) -> None:
    optimizer = Optimizer.Config(**CASES[case][0]).build()
    param = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))
    state = optimizer.init_state(param)
    grad = torch.randn(SHAPE, generator=torch.Generator().manual_seed(4))
    grad_before = grad.clone()
    for step in (1, 2):
        optimizer.update(param, grad, state, step)
    assert torch.equal(grad, grad_before)


def test_zero_gradient_leaves_param_unchanged_without_weight_decay() -> None:
    param0 = torch.randn(SHAPE, generator=torch.Generator().manual_seed(5))
    for name in OPTIMIZERS:
        optimizer = Optimizer.Config(name=name).build()
        param = param0.clone()
        state = optimizer.init_state(param)
        for step in range(1, 4):
            optimizer.update(param, torch.zeros(SHAPE), state, step)
        assert torch.equal(param, param0), name


def test_state_is_tensors_only_and_shaped_like_param() -> None:
    param = torch.zeros(3, 4)
    expected = {
        "sgd": {"momentum_buffer"},
        "adam": {"exp_avg", "exp_avg_sq"},
        "adamw": {"exp_avg", "exp_avg_sq"},
    }
    for name, keys in expected.items():
        state = Optimizer.Config(name=name).build().init_state(param)
        assert set(state) == keys
        for tensor in state.values():
            assert isinstance(tensor, torch.Tensor)
            assert tensor.shape == param.shape and tensor.dtype == torch.float32
            assert not tensor.any()
    assert Optimizer.Config(name="sgd", momentum=0.0).build().init_state(param) == {}


@pytest.mark.parametrize("case", ["sgd_momentum", "sgd_nesterov", "adam_weight_decay", "adamw"])
def test_mask_keeps_pruned_entries_and_their_state_exactly_zero(case: str) -> None:
    ours_kwargs, torch_cls, torch_kwargs = CASES[case]
    gen = torch.Generator().manual_seed(6)
    param0 = torch.randn(SHAPE, generator=gen)
    mask = torch.rand(SHAPE, generator=gen) < 0.4
    assert 0 < mask.sum() < mask.numel()
    grads = _gradients(7)
    optimizer = Optimizer.Config(**ours_kwargs).build()

    ours, our_state = _run_ours(optimizer, param0, grads, mask=mask)
    ref, _ = _run_torch(torch_cls, torch_kwargs, param0, grads)

    assert not ours[mask].any()
    for key, tensor in our_state.items():
        assert not tensor[mask].any(), key
    # Every rule is elementwise, so live entries follow the unmasked run bit for bit.
    assert torch.equal(ours[~mask], ref[~mask])


# Sizes around every vector width (scalar tails of 1..15 entries) and a large one.
KEPT_SIZES = [1, 2, 7, 8, 9, 15, 16, 17, 31, 33, 63, 65, 1000, 4099, 100_003]


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("keep", [0.0, 0.1, 0.5, 1.0])
def test_update_kept_is_bitwise_update_with_mask(case: str, keep: float) -> None:
    """Only the kept entries are updated, and they come out as the masked update's, bit for bit,
    whichever of them land in a vectorised loop or its scalar tail."""
    optimizer = Optimizer.Config(**CASES[case][0]).build()
    for numel in KEPT_SIZES:
        gen = torch.Generator().manual_seed(numel)
        mask = torch.rand((numel,), generator=gen) >= keep
        param = torch.randn((numel,), generator=gen).masked_fill_(mask, 0.0)
        state = optimizer.init_state(param)
        kept = torch.logical_not(mask).nonzero().squeeze(1)
        compact, compact_state = param.clone(), {k: t.clone() for k, t in state.items()}
        for step in range(1, 4):
            # Gradients are dense: the pruned entries' values must not leak in.
            grad = 1e-3 * torch.randn((numel,), generator=gen)
            optimizer.update(param, grad, state, step, mask=mask)
            optimizer.update_kept(compact, grad, compact_state, step, kept)
            assert torch.equal(compact, param), (numel, step)
            for key in state:
                assert torch.equal(compact_state[key], state[key]), (numel, step, key)
        assert not compact[mask].any()


def test_update_kept_takes_any_shape_and_a_noncontiguous_gradient() -> None:
    optimizer = Optimizer.Config(name="adamw", lr=1e-2, weight_decay=0.1).build()
    gen = torch.Generator().manual_seed(9)
    mask = torch.rand(SHAPE, generator=gen) < 0.6
    param = torch.randn(SHAPE, generator=gen).masked_fill_(mask, 0.0)
    grad = torch.randn(SHAPE[::-1], generator=gen).t()
    assert not grad.is_contiguous()
    state, compact_state = optimizer.init_state(param), optimizer.init_state(param)
    compact = param.clone()
    optimizer.update(param, grad, state, 1, mask=mask)
    optimizer.update_kept(compact, grad, compact_state, 1, (~mask).reshape(-1).nonzero()[:, 0])
    assert torch.equal(compact, param) and compact.shape == SHAPE
    with pytest.raises(ValueError, match="step must be >= 1"):
        optimizer.update_kept(compact, grad, compact_state, 0, torch.zeros(0, dtype=torch.long))


def test_mask_state_cannot_revive_pruned_entry_on_zero_gradient() -> None:
    optimizer = Optimizer.Config(name="sgd", lr=0.1, momentum=0.9).build()
    param = torch.ones(4)
    state = optimizer.init_state(param)
    mask = torch.tensor([True, False, False, False])
    optimizer.update(param, torch.ones(4), state, 1, mask=mask)
    # Without the mask the momentum buffer would move the pruned entry on this step.
    optimizer.update(param, torch.zeros(4), state, 2, mask=mask)
    assert param[0].item() == 0.0
    assert state["momentum_buffer"][0].item() == 0.0
    assert param[1].item() != 1.0


@pytest.mark.parametrize(
    "mask",
    [torch.zeros(SHAPE, dtype=torch.float32), torch.zeros((5, 7), dtype=torch.bool)],
    ids=["float_mask", "wrong_shape"],
)
def test_invalid_mask_raises(mask: torch.Tensor) -> None:
    optimizer = Optimizer.Config(name="adam").build()
    param = torch.zeros(SHAPE)
    with pytest.raises(ValueError, match="mask must be a bool tensor of shape"):
        optimizer.update(param, torch.zeros(SHAPE), optimizer.init_state(param), 1, mask=mask)


def test_step_must_be_one_based() -> None:
    optimizer = Optimizer.Config(name="adam").build()
    param = torch.zeros(SHAPE)
    with pytest.raises(ValueError, match="step must be >= 1"):
        optimizer.update(param, torch.zeros(SHAPE), optimizer.init_state(param), 0)


def test_build_picks_class_by_name() -> None:
    assert {"sgd": SGD, "adam": Adam, "adamw": AdamW} == OPTIMIZERS
    for name, cls in OPTIMIZERS.items():
        config = Optimizer.Config(name=name)
        optimizer = config.build()
        assert type(optimizer) is cls
        assert optimizer.config is config


def test_class_rejects_config_of_other_name() -> None:
    with pytest.raises(ValueError, match="name = 'adam' does not match SGD"):
        SGD(Optimizer.Config(name="adam"))


def test_defaults_follow_torch() -> None:
    config = Optimizer.Config()
    torch_adam = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))]).defaults
    assert config.name == "adamw"
    assert config.lr == torch_adam["lr"]
    assert (config.beta1, config.beta2) == torch_adam["betas"]
    assert config.eps == torch_adam["eps"]
    torch_sgd = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))]).defaults
    assert config.dampening == torch_sgd["dampening"]
    assert config.nesterov == torch_sgd["nesterov"]


def test_every_field_is_documented() -> None:
    docs = field_docs(Optimizer.Config)
    assert set(docs) == {f.name for f in dataclasses.fields(Optimizer.Config)}
    assert all(docs.values())


def test_config_loads_from_dict() -> None:
    config = from_dict(Optimizer.Config, {"name": "sgd", "lr": 0.1, "nesterov": True})
    assert isinstance(config.build(), SGD)
    with pytest.raises(ValueError, match="name = 'lamb' is not valid"):
        from_dict(Optimizer.Config, {"name": "lamb"})


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(lr=0.0), "lr must be > 0, got 0.0"),
        (dict(lr=-1e-3), "lr must be > 0"),
        (dict(momentum=1.0), r"momentum must be in \[0, 1\), got 1.0"),
        (dict(momentum=-0.1), r"momentum must be in \[0, 1\)"),
        (dict(dampening=1.5), r"dampening must be in \[0, 1\], got 1.5"),
        (dict(nesterov=True, momentum=0.0), "nesterov requires momentum > 0 and dampening == 0"),
        (dict(nesterov=True, dampening=0.1), "nesterov requires momentum > 0 and dampening == 0"),
        (dict(weight_decay=-0.01), "weight_decay must be >= 0, got -0.01"),
        (dict(beta1=1.0), r"beta1 must be in \[0, 1\), got 1.0"),
        (dict(beta2=-0.5), r"beta2 must be in \[0, 1\), got -0.5"),
        (dict(eps=0.0), "eps must be > 0, got 0.0"),
        # Settings that can only give NaN/Inf weights.
        (dict(lr=float("inf")), "lr = inf is not valid; it must be a finite number"),
        (dict(lr=float("nan")), "lr = nan is not valid"),
        (dict(momentum=float("nan")), "momentum = nan is not valid"),
        (dict(weight_decay=float("inf")), "weight_decay = inf is not valid"),
        (dict(beta2=float("nan")), "beta2 = nan is not valid"),
        (dict(eps=float("inf")), "eps = inf is not valid"),
        (dict(nonfinite="ignore"), None),
    ],
)
def test_config_validation(kwargs: dict, message: str | None) -> None:
    if message is None:  # a Literal field: checked by from_dict, with the dotted name
        with pytest.raises(ValueError, match=r"optimizer.nonfinite = 'ignore' is not valid"):
            from_dict(Optimizer.Config, kwargs, "optimizer")
        return
    with pytest.raises(ValueError, match=message):
        Optimizer.Config(**kwargs)


def test_config_edge_values_are_valid() -> None:
    Optimizer.Config(momentum=0.0, dampening=1.0, weight_decay=0.0, beta1=0.0, beta2=0.0)
