"""Compile, run and stats on cases small enough to work out by hand.

The round hardware (conftest.py) computes at 5e11 FLOP/s, streams at 1e9 B/s
(the SwarmX lanes, 4 x 0.5e9 B/s, are not the bottleneck), updates 1e9
parameters/s and adds 1 ms per SwarmX hop.
"""

from __future__ import annotations

import dataclasses

import pytest

from core.cost.workload import LayerProfile, Workload
from core.presets import load_hardware
from emulator.cost.compile import Cluster, compile_step
from emulator.cost.gpt import gpt_workload
from emulator.cost.stats import first_nonlinear, predict, simulate, sweep


def _layer(name: str = "a", **overrides) -> LayerProfile:
    # 2 s to stream in, 2 s to stream out, 1 s to update; 2 s forward and 4 s backward per sample.
    fields = dict(
        name=name,
        num_params=1_000_000_000,
        weight_bytes=2e9,
        grad_bytes=2e9,
        forward_flops=1e12,
        activation_bytes=0.0,
    )
    return LayerProfile(**{**fields, **overrides})


def _workload(*layers: LayerProfile, samples: int = 1) -> Workload:
    return Workload(name="toy", layers=layers, samples_per_step=samples)


def test_one_compute_bound_layer_on_one_node(hardware):
    # forward max(2 s compute, 2 s stream) + backward max(4, 2, 2) + update 1 s.
    stats = predict(_workload(_layer()), hardware, 1)
    assert stats.step_time_s == pytest.approx(7.0)
    assert stats.exposed_update_s == pytest.approx(1.0)
    assert stats.bound == "compute"
    assert stats.swarmx_depth == 0 and stats.num_swarmx_nodes == 0


def test_one_stream_bound_layer_on_one_node(hardware):
    # 0.2 s forward, 0.4 s backward: both passes wait 2 s for their weights.
    stats = predict(_workload(_layer(forward_flops=1e11)), hardware, 1)
    assert stats.step_time_s == pytest.approx(2.0 + 2.0 + 1.0)
    assert stats.bound == "stream"
    assert stats.compute_busy_fraction == pytest.approx(0.6 / 5.0)
    # 3 FLOP-seconds at peak 1e12 over 5 s.
    assert stats.compute_utilization == pytest.approx(3e11 / 5.0 / 1e12)


def test_tree_latency_on_two_nodes(hardware):
    # One sample each; a tree of depth 1 delays the first chunk and the gradient by 1 ms.
    stats = predict(_workload(_layer(), samples=2), hardware, 2)
    assert stats.swarmx_depth == 1 and stats.num_swarmx_nodes == 1
    assert stats.step_time_s == pytest.approx(7.0 + 0.002)


def test_next_layer_prefetches_while_the_current_one_computes(hardware):
    # Forward a, b: 2 + 2 s; backward b, a: 4 + 4 s; every 1 s stream hides behind compute;
    # b's update (0.5 s) hides behind a's backward, a's update is exposed.
    a = _layer("a", num_params=500_000_000, weight_bytes=1e9, grad_bytes=1e9)
    b = _layer("b", num_params=500_000_000, weight_bytes=1e9, grad_bytes=1e9)
    stats, timeline = simulate(_workload(a, b), hardware, 1)
    assert stats.step_time_s == pytest.approx(12.5)
    assert timeline.stream_in_busy_s == pytest.approx(4.0)
    assert timeline.update_busy_s == pytest.approx(1.0)
    assert stats.exposed_update_s == pytest.approx(0.5)


def test_micro_batches_stream_the_weights_again(hardware):
    # 0.3 GB of activations per sample, 0.5 GB of SRAM for them: one sample per micro-batch,
    # so 10 samples run as 10 micro-batches of 6 s each, then one 1 s update.
    workload = _workload(_layer(activation_bytes=0.3e9), samples=10)
    fast, _ = simulate(workload, hardware, 1)
    full, timeline = simulate(workload, hardware, 1, record_events=True)
    assert fast.num_micro_batches == 10 and fast.memory_fit == "10 micro-batches"
    assert fast.step_time_s == pytest.approx(10 * 6.0 + 1.0)
    # The periodic shortcut and the event-by-event run agree.
    assert full.step_time_s == pytest.approx(fast.step_time_s, rel=1e-12)
    assert timeline.stream_in_busy_s == pytest.approx(10 * 4.0)


def test_energy_per_component(hardware):
    stats = predict(_workload(_layer(), samples=2), hardware, 2)
    step = stats.step_time_s
    # Wafers draw half power while idle (idle_power_fraction 0.5) and compute 6 s each.
    assert stats.energy_by_component_j["wafer"] == pytest.approx(
        2 * 1000.0 * (0.5 * step + 0.5 * 6.0)
    )
    assert stats.energy_by_component_j["memoryx"] == pytest.approx(100.0 * step)
    assert stats.energy_by_component_j["swarmx"] == pytest.approx(10.0 * step)
    assert stats.energy_j == pytest.approx(sum(stats.energy_by_component_j.values()))


def test_swarmx_tree_shape():
    tree = load_hardware("cs2").swarmx.build()
    assert [tree.depth(n) for n in (1, 2, 4, 5, 16, 17, 192)] == [0, 1, 1, 2, 2, 3, 4]
    assert tree.nodes_per_level(192) == [48, 12, 3, 1]
    assert tree.nodes_per_level(5) == [2, 1]


def test_more_nodes_never_slower_while_compute_bound(hardware):
    # 64 samples of a layer that is compute-bound down to ~2 samples per node.
    workload = _workload(_layer(forward_flops=1e12), samples=64)
    results = sweep(workload, hardware, [1, 2, 4, 8, 16, 32, 64])
    compute_bound = [s for s in results if s.bound == "compute"]
    assert len(compute_bound) >= 5
    times = [s.step_time_s for s in compute_bound]
    assert all(later <= earlier for earlier, later in zip(times, times[1:], strict=False))
    assert all(s.scaling_efficiency > 0.8 for s in compute_bound)


def test_efficiency_drops_once_stream_bound(hardware):
    # 0.1 s of forward compute per sample against 2 s of stream: stream-bound below 20 samples.
    workload = _workload(_layer(forward_flops=5e10), samples=64)
    results = {s.num_nodes: s for s in sweep(workload, hardware, [1, 2, 4, 8, 16, 32, 64])}
    assert results[1].bound == "compute" and results[64].bound == "stream"
    assert results[64].scaling_efficiency < 0.3 < results[2].scaling_efficiency
    efficiencies = [results[n].scaling_efficiency for n in sorted(results)]
    assert all(b <= a + 1e-12 for a, b in zip(efficiencies, efficiencies[1:], strict=False))
    knee = first_nonlinear(list(results.values()))
    # The knee comes from the forward pass turning stream-bound.
    assert knee is not None and knee.stream_bound_fraction > results[1].stream_bound_fraction


def test_gpt3_175b_scales_linearly_then_bends():
    results = {
        s.num_nodes: s
        for s in sweep(gpt_workload("gpt3-175b"), load_hardware("cs2"), [1, 16, 64, 192])
    }
    assert results[16].scaling_efficiency > 0.99
    assert results[192].scaling_efficiency < 0.9
    assert results[192].stream_bound_fraction > results[16].stream_bound_fraction


def test_model_state_beyond_memoryx_gives_the_numbers():
    with pytest.raises(ValueError) as error:
        predict(gpt_workload("gpt-120t"), load_hardware("cs3"), 1)
    message = str(error.value)
    assert "5.94 PB of MemoryX state at 50 B/parameter" in message
    assert "largest MemoryX holds 1.2 PB" in message and "24T parameters" in message


def test_the_smallest_fitting_memoryx_is_chosen_and_a_chosen_one_is_checked():
    hardware = load_hardware("cs2")
    stats = predict(gpt_workload("gpt3-175b"), hardware, 192)
    assert stats.memoryx_capacity_bytes == pytest.approx(4e12)  # 3.49 TB of state
    assert stats.model_state_bytes == pytest.approx(174.6e9 * 20, rel=1e-3)
    with pytest.raises(ValueError, match=r"3.49 TB of MemoryX state .* chosen MemoryX of 1 TB"):
        predict(gpt_workload("gpt3-175b"), hardware, 192, memoryx_capacity_bytes=1e12)


def test_activations_beyond_sram_give_the_numbers():
    with pytest.raises(ValueError, match=r"413 GB of activations per sample, more than the 30 GB"):
        predict(gpt_workload("gpt-120t", seq_len=2048), load_hardware("cs2"), 1)


def test_node_count_above_the_preset_maximum_names_both():
    with pytest.raises(ValueError, match=r"num_nodes = 193 .* cs2 preset; it supports 1 to 192"):
        predict(gpt_workload("gpt3-175b"), load_hardware("cs2"), 193)
    with pytest.raises(ValueError, match=r"batch of 8 samples cannot be shared by 16 systems"):
        predict(gpt_workload("gpt3-175b", batch_size=8), load_hardware("cs2"), 16)


def test_compile_counts_hops_and_operations(hardware):
    cluster = Cluster.Config(hardware=hardware, num_nodes=5).build()
    compiled = compile_step(_workload(_layer("a"), _layer("b"), samples=10), cluster)
    assert [op.layer for op in compiled.operations] == ["a", "b", "b", "a"]
    assert [op.grad_out_bytes for op in compiled.operations] == [0.0, 0.0, 2e9, 2e9]
    # 10 samples over 5 nodes: 2 per node, 1e12 FLOPs each forward.
    assert compiled.operations[0].flops_per_node == pytest.approx(2e12)
    assert cluster.hardware.swarmx.depth(5) == 2


def test_sparsity_speeds_up_compute_bound_layers(hardware):
    dense = _layer()
    sparse = dataclasses.replace(dense, weight_density=0.5, weight_bytes=1e9)
    assert predict(_workload(sparse), hardware, 1).step_time_s == pytest.approx(
        max(1.0, 1.0) + max(2.0, 1.0, 2.0) + 1.0
    )
    assert predict(_workload(dense), hardware, 1).step_time_s == pytest.approx(7.0)


def test_round_hardware_streams_at_the_slowest_link(hardware):
    assert hardware.build().stream_bandwidth_bytes_per_s == pytest.approx(1e9)


def test_emulated_block_for_functional_runs(hardware):
    stats = predict(_workload(_layer()), hardware, 1)
    emulated = stats.emulated()
    assert emulated["step_time_s"] == stats.step_time_s == pytest.approx(7.0)
    assert emulated["energy_j"] == pytest.approx(sum(emulated["energy_by_component_j"].values()))
    assert emulated["time_by_component_s"] == pytest.approx(
        {"wafer_compute": 6.0, "stream_in": 4.0, "stream_out": 2.0, "memoryx_update": 1.0}
    )
