"""Node groups without a cluster: config, shares, mixing and the per-group emulated clock."""

from __future__ import annotations

import pytest
import torch

from core.cost.profile import profile_modules
from core.data import BatchSampler
from emulator.config import load_config, parse_node_groups
from emulator.emulated import emulate
from emulator.groups import (
    check_mixable,
    emulate_groups,
    group_shares,
    group_times,
    node_spans,
    split_batch,
    stream_dtype,
    subtree_dtypes,
)
from emulator.zoo import group_layers, model_blocks


def _layers(config):
    return group_layers(model_blocks(config.model.build(seed=0)))


def _workload(config):
    layers = _layers(config)
    dataset = config.data_config.build(seed=0)
    return profile_modules(
        "mlp-digits",
        [(f"layer{i}", layer) for i, layer in enumerate(layers)],
        dataset.input_example(),
        samples_per_step=config.batch_size,
        precision="fp32",
    )


def test_yaml_groups_and_shorthand_agree():
    shorthand = load_config(overrides={"node_groups": "cs2:2,pcm:2"})
    yaml_like = load_config(
        overrides={
            "node_groups": [
                {"num_nodes": 2, "backend": {"kind": "cs2"}},
                {"num_nodes": 2, "backend": {"kind": "pcm"}},
            ]
        }
    )
    assert shorthand == yaml_like
    assert shorthand.num_nodes == 4
    assert [g.backend.kind for g in shorthand.groups] == ["cs2", "pcm"]
    # The lead group's backend is the cluster's backend: the config round-trips.
    assert shorthand.backend == shorthand.groups[0].backend


def test_preset_in_shorthand():
    config = load_config(overrides={"node_groups": "cs2:2,cs2@cs3:2"})
    assert config.groups[0].hardware is None
    assert config.groups[1].hardware.preset == "cs3"
    assert (
        config.group_hardware(config.groups[1]).name != config.group_hardware(config.groups[0]).name
    )


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"node_groups": "cs2:2,pcm:0"}, "node_groups[1].num_nodes"),
        (
            {"node_groups": [{"num_nodes": 1, "backend": {"kind": "nope"}}]},
            "node_groups[0].backend.kind",
        ),
        ({"node_groups": "cs2:2,cs2@nope:2"}, "node_groups[1].hardware.preset"),
        ({"node_groups": "cs2:2,pcm:2", "num_nodes": 3}, "num_nodes"),
        ({"node_groups": "cs2:2,pcm:2", "backend.kind": "pcm"}, "backend"),
        ({"node_groups": []}, "node_groups"),
        ({"node_groups": "cs2:2;pcm:2"}, "node_groups[0].backend.kind"),
        ({"node_groups": "cs2:x"}, "--node-groups"),
    ],
)
def test_bad_groups_name_the_field(overrides, field):
    with pytest.raises(ValueError) as err:
        load_config(overrides=overrides)
    assert str(err.value).startswith(field)


def test_parse_node_groups():
    assert parse_node_groups("cs2:2, pcm@cs3:1") == [
        {"num_nodes": 2, "backend": {"kind": "cs2"}},
        {"num_nodes": 1, "backend": {"kind": "pcm"}, "hardware": {"preset": "cs3"}},
    ]


def test_split_batch_is_proportional_and_exact():
    assert split_batch(128, [1.0, 1.0], [2, 2]) == [64, 64]
    assert split_batch(100, [3.0, 1.0], [1, 1]) == [75, 25]
    shares = split_batch(128, [1.0, 2.0, 4.0], [1, 1, 1])
    assert sum(shares) == 128 and shares == sorted(shares)
    # A very slow group still gets one sample per node.
    assert split_batch(10, [1000.0, 1e-9], [2, 3]) == [7, 3]


def test_node_spans_tile_the_batch():
    config = load_config(overrides={"node_groups": "cs2:2,pcm:3", "balance": "throughput"})
    spans = node_spans(config.groups, [50, 78])
    assert spans == [(0, 25), (25, 50), (50, 76), (76, 102), (102, 128)]
    sampler = BatchSampler(1000, 128, seed=0)
    pieces = torch.cat([sampler.span(3, *s) for s in spans])
    assert torch.equal(pieces, sampler.global_batch(3))


def test_equal_balance_gives_equal_shards():
    config = load_config(overrides={"node_groups": "cs2:2,pcm:2", "batch_size": 128})
    assert group_shares(config) == [64, 64]


def test_throughput_balance_favours_the_faster_group_and_evens_the_times():
    base = {"node_groups": "cs2:2,pcm:2", "batch_size": 128}
    equal = load_config(overrides=base)
    throughput = load_config(overrides={**base, "balance": "throughput"})
    workload = _workload(equal)
    even = group_shares(equal, workload)
    weighed = group_shares(throughput, workload)
    assert sum(weighed) == 128 and min(weighed) >= 2
    # Shares follow each group's speed on the whole batch.
    alone = group_times(workload, throughput, [128, 128])
    speeds = [128 / t for t in alone]
    faster = speeds.index(max(speeds))
    assert weighed[faster] > even[faster]
    # In proportion to speed, but never under one sample per node.
    assert weighed == split_batch(128, speeds, [2, 2])
    # The groups finish closer together than with equal shares.
    spread_equal = max(group_times(workload, equal, even)) - min(group_times(workload, equal, even))
    times = group_times(workload, throughput, weighed)
    assert max(times) - min(times) < spread_equal


def test_emulated_step_is_the_slowest_group():
    config = load_config(overrides={"node_groups": "cs2:2,pcm:2", "batch_size": 128})
    workload = _workload(config)
    grouped = emulate_groups(workload, config, [64, 64], peak_activation_bytes_per_node=[0, 0])
    times = [g.step.stats.step_time_s for g in grouped.groups]
    assert grouped.step_time_s == max(times)
    data = grouped.to_json(swarmx_power_w=0.0)
    assert data["step_time_s"] == max(times)
    assert [g["kind"] for g in data["groups"]] == ["cs2", "pcm"]
    assert [g["batch_share"] for g in data["groups"]] == [64, 64]
    for group, time_s in zip(data["groups"], times, strict=True):
        assert group["node_time_s"] == time_s
        assert group["idle_s"] == pytest.approx(max(times) - time_s)
        assert group["energy_j"] > 0
    assert min(g["idle_s"] for g in data["groups"]) == 0.0
    # Each group's node time is what its own engine and preset give on its share alone.
    alone = emulate(
        workload.__class__(**{**workload.__dict__, "samples_per_step": 64}),
        config.group_hardware(config.groups[1]),
        2,
        peak_activation_bytes_per_node=0,
        engine=config.groups[1].backend.engine(config.group_hardware(config.groups[1])),
    )
    assert data["groups"][1]["node_time_s"] == alone.stats.step_time_s
    # The trace names every group's nodes.
    components = {e.component for e in grouped.events()}
    assert any(c.startswith("group 0 (cs2) node") for c in components)
    assert any(c.startswith("group 1 (pcm) node") for c in components)


def test_cs2_and_cs3_presets_mix():
    config = load_config(overrides={"node_groups": "cs2:2,cs2@cs3:2", "batch_size": 128})
    workload = _workload(config)
    grouped = emulate_groups(workload, config, [64, 64], peak_activation_bytes_per_node=[0, 0])
    hardware = [g["hardware"] for g in grouped.to_json(swarmx_power_w=0.0)["groups"]]
    assert hardware[0] != hardware[1]
    times = [g.step.stats.step_time_s for g in grouped.groups]
    # The same share on the newer wafer is no slower.
    assert times[1] <= times[0]


def test_photonic_backprop_does_not_mix_with_cs2():
    config = load_config(
        overrides={
            "node_groups": [
                {"num_nodes": 1, "backend": {"kind": "cs2"}},
                {"num_nodes": 1, "backend": {"kind": "photonic", "training": "backprop"}},
            ],
            "batch_size": 2,
        }
    )
    with pytest.raises(ValueError, match=r"node_groups\[1\] \(photonic\).*MZI phases"):
        check_mixable(config, _layers(config))


def _fp16_beside_fp32(**extra):
    return load_config(
        overrides={
            "node_groups": [
                {"num_nodes": 2, "backend": {"kind": "cs2", "precision": "fp16"}},
                {"num_nodes": 1, "backend": {"kind": "cs2"}},
            ],
            "batch_size": 3,
            "balance": "throughput",
            **extra,
        }
    )


def test_different_wire_dtypes_stream_fp32_and_round_per_node():
    config = _fp16_beside_fp32()
    check_mixable(config, _layers(config))  # dense weights mix
    assert stream_dtype(config) == "float32"
    tree = config.swarmx.build(config.num_nodes)
    dtypes = subtree_dtypes(tree, ["float16", "float16", "float32"])
    assert [dtypes[f"node-{r}"] for r in range(3)] == ["float16", "float16", "float32"]
    assert dtypes[tree[-1].name] == "float32"
    assert subtree_dtypes(tree, ["float16"] * 3) == {}
    # Each group's emulated step streams its own bytes: the fp16 group half the fp32 one's.
    grouped = emulate_groups(
        _workload(config), config, [2, 1], peak_activation_bytes_per_node=[0, 0]
    )
    halves, whole = (g.step.workload for g in grouped.groups)
    assert (halves.precision, whole.precision) == ("fp16", "fp32")
    assert 2 * halves.layers[0].weight_bytes == pytest.approx(whole.layers[0].weight_bytes)


def test_different_wire_dtypes_with_sparsity_are_refused():
    config = _fp16_beside_fp32(**{"sparsity.sparsity": 0.5})
    with pytest.raises(ValueError, match=r"node_groups\[1\].*sparse streams"):
        check_mixable(config, _layers(config))
