"""The emulated clock of a functional run agrees with ``wafer simulate``.

Fast tests build the measured workload from plain numbers, or from what
``NodeWorker`` (plain torch, no Ray) counts, and compare it field by field
with the workload ``wafer simulate`` profiles. The integration test trains on
real Ray actors for 1, 2 and 4 nodes and compares the emulated step time
with the prediction.
"""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch

from core.presets import load_hardware
from emulator.cli import main
from emulator.cli_cost import resolve_workload
from emulator.config import load_config
from emulator.cost.stats import predict
from emulator.emulated import (
    LayerShape,
    PassMeasurement,
    check_fits,
    emulate,
    measured_workload,
)
from emulator.prepare import layer_shapes, prepare_layers
from nodes.worker import NodeWorker

BATCH = 64


def test_measured_workload_is_per_sample_and_per_node():
    shapes = [
        LayerShape(num_params=10, input_elements_per_sample=3),
        LayerShape(num_params=20, input_elements_per_sample=5),
    ]
    passes = [
        PassMeasurement(0, "forward", 2, 80, 0, 40.0),
        PassMeasurement(1, "forward", 2, 160, 0, 80.0),
        PassMeasurement(1, "backward", 2, 160, 160, 160.0),
        PassMeasurement(0, "backward", 2, 80, 80, 80.0),
    ]
    workload = measured_workload(
        "toy", shapes, passes, samples_per_step=8, tokens_per_sample=1, precision="fp32"
    )
    first, second = workload.layers
    assert (first.weight_bytes, first.grad_bytes) == (40, 40)  # per node, not summed
    assert (first.forward_flops, first.backward_flops) == (5, 10)  # per sample
    assert (second.forward_flops, second.backward_flops) == (10, 20)
    assert (first.activation_bytes, second.activation_bytes) == (3 * 4, 5 * 4)
    half = measured_workload(
        "toy", shapes, passes, samples_per_step=8, tokens_per_sample=1, precision="bf16"
    )
    assert half.layers[1].activation_bytes == 5 * 2


def _node_measurements(config, layers, dataset) -> list[PassMeasurement]:
    """What the root SwarmX would acknowledge for one step: every node's counts, summed."""
    backend = config.backend.build()
    dtype = getattr(torch, backend.wire_dtype)
    params = [{n: p.detach().to(dtype) for n, p in layer.named_parameters()} for layer in layers]
    wire = [sum(t.numel() * t.element_size() for t in p.values()) for p in params]
    grads = [sum(t.numel() * 4 for t in p.values()) for p in params]
    totals = {}
    for rank in range(config.num_nodes):
        worker = NodeWorker(
            rank=rank,
            num_nodes=config.num_nodes,
            # The worker strips the weights from its layers: give it copies.
            layers=copy.deepcopy(layers),
            dataset=dataset,
            batch_size=config.batch_size,
            seed=config.seed,
            backend=backend,
        )
        for index in range(len(layers)):
            totals[index, "forward"] = (
                totals.get((index, "forward"), 0.0) + worker.forward(index, 0, params[index]).flops
            )
        for index in reversed(range(len(layers))):
            _, result = worker.backward(index, 0, params[index])
            totals[index, "backward"] = totals.get((index, "backward"), 0.0) + result.flops
    n = config.num_nodes
    return [
        PassMeasurement(
            layer, phase, n, wire[layer] * n, grads[layer] * n if phase == "backward" else 0, flops
        )
        for (layer, phase), flops in totals.items()
    ]


@pytest.mark.parametrize(
    ("model", "num_nodes", "precision"),
    [
        ("mlp-digits", 1, "fp32"),
        ("mlp-digits", 2, "fp32"),
        ("cnn-digits", 2, "fp32"),
        ("gpt-tiny", 2, "fp32"),
    ],
)
def test_measured_workload_equals_the_simulated_one(model, num_nodes, precision):
    config = load_config(
        overrides={
            "model.name": model,
            "num_nodes": num_nodes,
            "batch_size": 8,
            "backend.precision": precision,
        }
    )
    layers, dataset = prepare_layers(config)
    tokens = 1 if dataset.task == "classification" else int(dataset.train_targets.shape[1])
    measured = measured_workload(
        model,
        layer_shapes(layers, dataset.input_example()),
        _node_measurements(config, layers, dataset),
        samples_per_step=8,
        tokens_per_sample=tokens,
        precision=config.backend.wire_precision,
    )
    simulated = resolve_workload(model, 8, None, precision)
    assert len(measured.layers) == len(simulated.layers)
    for got, want in zip(measured.layers, simulated.layers, strict=True):
        got, want = dataclasses.asdict(got), dataclasses.asdict(want)
        got.pop("name"), want.pop("name")
        # Matmul shapes are exact: the same hooks see the same modules.
        assert got.pop("matmuls") == want.pop("matmuls")
        assert got.pop("optical_passes") == want.pop("optical_passes")
        assert got == pytest.approx(want, rel=1e-9)
    assert (measured.samples_per_step, measured.tokens_per_sample) == (8, tokens)


def test_hardware_config_errors_name_the_field():
    with pytest.raises(ValueError, match=r"hardware\.preset = 'cs9'.*cs2, cs3"):
        load_config(overrides={"hardware.preset": "cs9"})
    with pytest.raises(ValueError, match=r"hardware\.overrides.*compute_efficiency"):
        load_config(overrides={"hardware.overrides": {"wafer.compute_efficiency": 2}})
    with pytest.raises(ValueError, match=r"swarmx\.fanout"):
        load_config(overrides={"hardware.overrides": {"swarmx.fan_out": 2}})
    config = load_config(
        overrides={
            "hardware.preset": "cs3",
            "hardware.overrides": {"wafer.compute_efficiency": 0.4},
        }
    )
    assert config.emulated_hardware.wafer.compute_efficiency == 0.4
    assert config.emulated_hardware.name == "cs3"


def test_bad_hardware_flag_is_one_paragraph(capsys):
    assert main(["train", "--hardware", "cs9", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "hardware.preset = 'cs9'" in err and "\n" not in err


def test_hardware_that_cannot_hold_the_model_fails_before_the_run():
    config = load_config(overrides={"num_nodes": 2})
    layers, dataset = prepare_layers(config)
    shapes = layer_shapes(layers, dataset.input_example())
    tiny = load_hardware("cs2", {"memoryx.capacity_options_bytes": [1e3]})
    with pytest.raises(ValueError, match="MemoryX"):
        check_fits(
            "mlp", shapes, tiny, 2, samples_per_step=8, tokens_per_sample=1, precision="fp32"
        )


def test_one_node_trace_shows_its_swarmx_node():
    shapes = [LayerShape(num_params=1000, input_elements_per_sample=10)]
    passes = [
        PassMeasurement(0, "forward", 1, 4000, 0, 1e4),
        PassMeasurement(0, "backward", 1, 4000, 4000, 2e4),
    ]
    workload = measured_workload(
        "toy", shapes, passes, samples_per_step=4, tokens_per_sample=1, precision="fp32"
    )
    step = emulate(workload, load_hardware("cs2"), 1, peak_activation_bytes_per_node=100)
    assert {e.component for e in step.events} == {"MemoryX", "SwarmX L1.0", "node 0"}
    assert step.to_json()["memory"]["activations_fit"] is True


@pytest.mark.integration
@pytest.mark.parametrize("num_nodes", [1, 2, 4])
def test_functional_step_time_matches_simulate(ray_session, tmp_path, num_nodes, capsys):
    report_path, trace_path = tmp_path / "report.json", tmp_path / "trace.json"
    args = ["train", "--model", "mlp-digits", "--nodes", str(num_nodes), "--steps", "2"]
    args += ["--batch-size", str(BATCH), "--precision", "fp32", "--hardware", "cs2", "--quiet"]
    assert main([*args, "--json", str(report_path), "--trace", str(trace_path)]) == 0
    assert "emulated step (cs2)" in capsys.readouterr().out
    emulated = json.loads(report_path.read_text())["emulated"]
    predicted = predict(
        resolve_workload("mlp-digits", BATCH, None, "fp32"), load_hardware("cs2"), num_nodes
    )
    assert emulated["step_time_s"] == pytest.approx(predicted.step_time_s, rel=0.01)
    assert emulated["energy_j"] == pytest.approx(predicted.energy_j, rel=0.01)
    assert emulated["hardware"] == "cs2" and emulated["memory"]["activations_fit"]
    assert emulated["memory"]["activation_bytes_per_node"] > 0
    assert set(emulated["time_by_component_s"]) >= {"wafer_compute", "stream_in", "stream_out"}
    # The trace: one track (process) per component.
    trace = json.loads(trace_path.read_text())
    tracks = {e["args"]["name"] for e in trace["traceEvents"] if e.get("name") == "process_name"}
    swarmx = {t for t in tracks if t.startswith("SwarmX")}
    assert tracks == {"MemoryX", *swarmx, *(f"node {i}" for i in range(num_nodes))}
    assert len(swarmx) == 1  # fan-out 4: one SwarmX node over 1 to 4 nodes
    assert any(e.get("ph") == "X" for e in trace["traceEvents"])
