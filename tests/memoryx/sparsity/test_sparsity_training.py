"""50 steps of training a small model with MemoryX's optimizers and every algorithm's masks.

The loop does what MemoryX will do per layer: apply the reduced gradient with
``Optimizer.update(..., mask=...)``, then on update steps with finite
gradients ask the algorithm for new masks and apply them to weights and state.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call

from core.config import from_dict
from memoryx.optim import Optimizer
from memoryx.sparsity import Sparsity, apply_masks

NUM_STEPS = 50
UPDATE = {"freq": 4, "start": 2, "stop": 40}
ALGORITHM_CONFIGS = {
    "static": {"algorithm": "static", "sparsity": 0.8, "init_method": "topk"},
    "gmp": {"algorithm": "gmp", "sparsity": 0.8, "update": UPDATE},
    "set": {"algorithm": "set", "sparsity": 0.8, "update": UPDATE},
    "rigl": {"algorithm": "rigl", "sparsity": 0.8, "update": UPDATE},
}
OPTIMIZERS = {
    "sgd_momentum": Optimizer.Config(name="sgd", lr=0.2, momentum=0.9),
    "adamw": Optimizer.Config(name="adamw", lr=3e-2, weight_decay=0.01),
}


def _model_and_data() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 4))
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(128, 16, generator=generator)
    y = (x[:, :4] * 2 + x[:, 4:8]).argmax(dim=1)  # a learnable labelling
    return model, x, y


@pytest.mark.parametrize("optimizer_name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("algorithm", sorted(ALGORITHM_CONFIGS))
def test_masked_weights_stay_exactly_zero_for_50_steps(algorithm: str, optimizer_name: str) -> None:
    model, x, y = _model_and_data()
    optimizer = OPTIMIZERS[optimizer_name].build()
    params = {name: p.detach().clone() for name, p in model.named_parameters()}
    state = {name: optimizer.init_state(p) for name, p in params.items()}
    sparsity = from_dict(Sparsity.Config, ALGORITHM_CONFIGS[algorithm]).build(
        {name: tuple(p.shape) for name, p in params.items()}
    )
    assert list(sparsity.params) == ["0.weight", "2.weight"]  # the default filter: matrices
    masks = sparsity.init_masks(params)
    apply_masks(params, state, masks)

    losses, num_mask_changes = [], 0
    for step in range(NUM_STEPS):
        leaves = {name: p.clone().requires_grad_() for name, p in params.items()}
        loss = nn.functional.cross_entropy(functional_call(model, leaves, (x,)), y)
        grads = dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values())), strict=True))
        losses.append(loss.item())
        for name, param in params.items():
            optimizer.update(param, grads[name], state[name], step + 1, mask=masks.get(name))
        finite = all(bool(torch.isfinite(g).all()) for g in grads.values())
        new = sparsity.update_masks(step, params, grads, masks, grads_finite=finite)
        apply_masks(params, state, new, previous=masks)
        for name, mask in new.items():
            regrown = masks[name] & ~mask
            if not torch.equal(mask, masks[name]):
                num_mask_changes += 1
            # Pruned weights and their optimizer state are exactly zero; regrown
            # ones restart from zero.
            assert bool((params[name][mask | regrown] == 0).all()), (step, name)
            for key, tensor in state[name].items():
                assert bool((tensor[mask | regrown] == 0).all()), (step, name, key)
            assert int(mask.sum()) == sparsity.params[name].num_pruned(
                max([0] + [s for s in range(step + 1) if sparsity.is_update_step(s)])
            )
        masks = new

    for name, mask in masks.items():
        assert torch.count_nonzero(params[name][mask]) == 0
        assert int(mask.sum()) == round(0.8 * mask.numel())  # every ramp has ended by step 40
    if algorithm == "static":
        assert num_mask_changes == 0
    else:
        assert num_mask_changes > 0
    # Training still learns on the sparse model (every case ends below 0.4x its first loss).
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5
