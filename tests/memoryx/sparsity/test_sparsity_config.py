"""Sparsity config: loading, bad input, and which parameters the filters select."""

from __future__ import annotations

import pytest

from core.config import field_docs, from_dict
from memoryx.sparsity import ParamGroupConfig, Sparsity, UpdateSchedule, select_parameters
from memoryx.sparsity.schedules import (
    ConstantSchedule,
    CosineSchedule,
    LinearSchedule,
    PowerSchedule,
)

# A GPT-like naming, with the words the default filter excludes.
SHAPES = {
    "embedding.token.weight": (50, 16),
    "blocks.0.norm.weight": (16,),
    "blocks.0.attn.qkv.weight": (48, 16),
    "blocks.0.attn.qkv.bias": (48,),
    "blocks.0.fc1.weight": (64, 16),
    "blocks.0.fc2.weight": (16, 64),
    "blocks.1.fc1.weight": (64, 16),
    "lm_head.weight": (50, 16),
}
UPDATE = {"freq": 10, "start": 0, "stop": 100}


def _load(mapping: dict) -> Sparsity.Config:
    return from_dict(Sparsity.Config, mapping)


def test_loads_a_full_mapping() -> None:
    config = _load(
        {
            "algorithm": "set",
            "sparsity": {"kind": "linear", "init": 0.5, "final": 0.8},
            "init_method": "topk",
            "update": UPDATE,
            "drop_fraction": {"kind": "cosine", "init": 0.3},
            "groups": [{"param_filter": ["*.fc1.weight"], "sparsity": 0.9}],
            "seed": 3,
        }
    )
    assert isinstance(config.sparsity, LinearSchedule.Config)
    assert isinstance(config.drop_fraction, CosineSchedule.Config)
    assert config.update == UpdateSchedule.Config(freq=10, start=0, stop=100)
    assert config.groups == [ParamGroupConfig(param_filter=["*.fc1.weight"], sparsity=0.9)]
    for cls in (Sparsity.Config, ParamGroupConfig, UpdateSchedule.Config):
        assert all(field_docs(cls).values()), cls.__name__


@pytest.mark.parametrize(
    ("mapping", "message"),
    [
        ({"sparsity": 1.0}, r"^sparsity = 1.0 is not valid; the pruned fraction must lie in \[0, 1\)"),
        ({"sparsity": -0.1}, r"^sparsity = -0.1 is not valid"),
        (
            {"algorithm": "set", "sparsity": {"kind": "linear", "init": 0.5, "final": 1.0}, "update": UPDATE},
            r"^sparsity = a schedule over \[0.5, 1.0\] is not valid",
        ),
        (
            {"groups": [{"param_filter": ["*"], "sparsity": 1.5}]},
            r"^groups\[0\].sparsity = 1.5 is not valid",
        ),
        ({"groups": [{"param_filter": [], "sparsity": 0.5}]}, "param_filter must list at least one"),
        ({"algorithm": "magnitude", "sparsity": 0.5}, "algorithm = 'magnitude' is not valid; choose one of 'static'"),
        ({}, "sparsity is not set and groups is empty"),
        ({"algorithm": "gmp", "sparsity": 0.9}, "update is not set, but algorithm = 'gmp'"),
        ({"algorithm": "set", "sparsity": 0.9}, "update is not set, but algorithm = 'set'"),
        ({"algorithm": "rigl", "sparsity": 0.9}, "update is not set, but algorithm = 'rigl'"),
        ({"sparsity": 0.9, "update": UPDATE}, "update is set, but algorithm = 'static' never changes"),
        (
            {"sparsity": {"kind": "linear", "init": 0.1, "final": 0.5, "end": 9}},
            "sparsity is a schedule, but algorithm = 'static' keeps one mask",
        ),
        (
            {"algorithm": "gmp", "sparsity": {"kind": "linear", "init": 0.9, "final": 0.5}, "update": UPDATE},
            "sparsity must never decrease under algorithm = 'gmp'",
        ),
        (
            {"algorithm": "gmp", "sparsity": {"kind": "cycling", "values": [0.5, 0.9]}, "update": UPDATE},
            "sparsity must never decrease",
        ),
        (
            {"algorithm": "gmp", "sparsity": 0.9, "update": {"freq": 10}},
            "power schedule needs an end step: set its end, or the update schedule's stop",
        ),
        ({"sparsity": 0.9, "drop_fraction": 0.2}, "drop_fraction is set, but algorithm = 'static'"),
        (
            {"algorithm": "gmp", "sparsity": 0.9, "update": UPDATE, "groups": [{"param_filter": ["*"], "sparsity": 0.5, "drop_fraction": 0.1}]},
            "drop_fraction is set, but algorithm = 'gmp' never regrows",
        ),
        (
            {"algorithm": "set", "sparsity": 0.9, "update": UPDATE, "drop_fraction": 1.5},
            r"drop_fraction = 1.5 is not valid; the dropped fraction must lie in \[0, 1\]",
        ),
        (
            {"algorithm": "rigl", "sparsity": 0.9, "update": {"freq": 10}},
            "drop_fraction: a cosine schedule needs an end step",
        ),
        ({"sparsity": 0.5, "init_method": "magnitude"}, "init_method = 'magnitude' is not valid"),
        ({"algorithm": "set", "sparsity": 0.5, "update": {"freq": 0}}, r"^update.freq = 0 must be at least 1"),
    ],
)  # fmt: skip
def test_bad_input_names_the_field(mapping: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _load(mapping)


def test_direct_construction_rejects_an_unknown_algorithm() -> None:
    with pytest.raises(ValueError, match="algorithm = 'snip' is not valid; choose one of"):
        Sparsity.Config(algorithm="snip", sparsity=0.5)


def test_dynamic_defaults() -> None:
    gmp = _load({"algorithm": "gmp", "sparsity": 0.9, "update": UPDATE})
    ramp = gmp.sparsity_schedule(gmp.sparsity)
    assert ramp == PowerSchedule.Config(init=0.0, final=0.9)
    set_config = _load({"algorithm": "set", "sparsity": 0.9, "update": {"freq": 10}})
    drop = set_config.drop_fraction_schedule(None, set_config.update)
    assert [drop.value(t) for t in (0, 10**6)] == [0.3, 0.3]
    rigl = _load({"algorithm": "rigl", "sparsity": 0.9, "update": UPDATE})
    decay = rigl.drop_fraction_schedule(None, rigl.update)
    assert (decay.value(0), decay.value(50), decay.value(100)) == pytest.approx((0.3, 0.15, 0.0))
    assert rigl.sparsity_schedule(0.9) == ConstantSchedule.Config(value=0.9)


def test_default_filter_skips_vectors_embeddings_norms_and_the_head() -> None:
    selected = select_parameters(Sparsity.Config(sparsity=0.5), SHAPES)
    assert list(selected) == [
        "blocks.0.attn.qkv.weight",
        "blocks.0.fc1.weight",
        "blocks.0.fc2.weight",
        "blocks.1.fc1.weight",
    ]
    assert {p.source for p in selected.values()} == {"param_filter"}


def test_filters_match_globs_and_groups_take_precedence() -> None:
    config = Sparsity.Config(
        sparsity=0.5,
        param_filter=["blocks.*.weight"],
        init_method="topk",
        groups=[
            ParamGroupConfig(param_filter=["*.fc1.weight"], sparsity=0.9, init_method="random"),
            ParamGroupConfig(param_filter=["lm_head.*"], sparsity=0.25),
        ],
    )
    selected = select_parameters(config, SHAPES)
    assert list(selected) == [
        "blocks.0.norm.weight",
        "blocks.0.attn.qkv.weight",
        "blocks.0.fc1.weight",
        "blocks.0.fc2.weight",
        "blocks.1.fc1.weight",
        "lm_head.weight",
    ]
    assert selected["blocks.0.fc1.weight"].source == "groups[0]"
    assert selected["blocks.0.fc1.weight"].init_method == "random"
    assert selected["blocks.0.fc1.weight"].sparsity.value(0) == 0.9
    assert selected["lm_head.weight"].init_method == "topk"  # inherited from the top level
    assert selected["blocks.0.fc2.weight"].sparsity.value(0) == 0.5
    assert selected["blocks.0.fc2.weight"].num_pruned(0) == 512
    # Groups alone (no top-level sparsity) cover only what they match.
    only_groups = Sparsity.Config(groups=[ParamGroupConfig(param_filter=["*fc2*"], sparsity=0.5)])
    assert list(select_parameters(only_groups, SHAPES)) == ["blocks.0.fc2.weight"]


def test_a_pattern_that_matches_nothing_is_an_error() -> None:
    config = Sparsity.Config(sparsity=0.5, param_filter=["*.weight", "*.fc3.weight"])
    with pytest.raises(ValueError) as info:
        select_parameters(config, SHAPES)
    message = str(info.value)
    assert "param_filter pattern '*.fc3.weight' matches no parameter" in message
    assert "'embedding.token.weight'" in message and "(8 in all)" in message
    group = Sparsity.Config(groups=[ParamGroupConfig(param_filter=["fc1.weight"], sparsity=0.5)])
    with pytest.raises(
        ValueError, match=r"groups\[0\].param_filter pattern 'fc1.weight' matches no"
    ):
        select_parameters(group, SHAPES)


def test_the_default_filter_matching_nothing_is_an_error() -> None:
    with pytest.raises(ValueError, match="the default param_filter .* matches no parameter"):
        select_parameters(Sparsity.Config(sparsity=0.5), {"bias": (4,), "norm.weight": (2, 2)})


def test_overlapping_groups_are_an_error() -> None:
    config = Sparsity.Config(
        groups=[
            ParamGroupConfig(param_filter=["blocks.0.*"], sparsity=0.5),
            ParamGroupConfig(param_filter=["*.fc1.weight"], sparsity=0.9),
        ]
    )
    with pytest.raises(
        ValueError, match=r"'blocks.0.fc1.weight' matches both groups\[0\] and groups\[1\]"
    ):
        select_parameters(config, SHAPES)


def test_build_checks_shapes_of_the_weights_it_masks() -> None:
    import torch

    sparsity = Sparsity.Config(sparsity=0.5).build(SHAPES)
    with pytest.raises(ValueError, match="has shape \\(16, 16\\), but the sparsity was resolved"):
        sparsity.init_masks({"blocks.0.fc1.weight": torch.zeros(16, 16)})
    # Parameters outside the selection get no mask.
    assert sparsity.init_masks({"blocks.0.attn.qkv.bias": torch.zeros(48)}) == {}
