"""Heterogeneous clusters on real Ray actors and real gRPC on loopback."""

from __future__ import annotations

import pytest
import torch

from emulator.config import load_config
from emulator.train import train

pytestmark = pytest.mark.integration


def _flat(weights: list[dict[str, torch.Tensor]]) -> list[torch.Tensor]:
    return [t for layer in weights for t in layer.values()]


def test_two_groups_of_one_kind_equal_one_pure_cluster_bitwise(ray_session):
    common = {"model.name": "mlp-digits", "batch_size": 32, "num_steps": 4, "seed": 5}
    pure = train(load_config(overrides={**common, "num_nodes": 4}), progress=False)
    grouped = train(load_config(overrides={**common, "node_groups": "cs2:2,cs2:2"}), progress=False)
    assert [s.loss for s in grouped.steps] == [s.loss for s in pure.steps]
    for got, want in zip(_flat(grouped.final_weights), _flat(pure.final_weights), strict=True):
        assert torch.equal(got, want)
    assert grouped.evals[-1].accuracy == pure.evals[-1].accuracy
    groups = grouped.to_json()["emulated"]["groups"]
    assert [g["batch_share"] for g in groups] == [16, 16]
    assert [g["idle_s"] for g in groups] == [0.0, 0.0]


def test_cs2_and_pcm_train_mlp_digits_together(ray_session):
    config = load_config(
        overrides={
            "model.name": "mlp-digits",
            "node_groups": "cs2:2,pcm:2",
            "batch_size": 64,
            "num_steps": 120,
            "seed": 0,
        }
    )
    report = train(config, progress=False)
    assert report.evals[-1].accuracy >= 0.90
    emulated = report.to_json()["emulated"]
    groups = emulated["groups"]
    assert [(g["kind"], g["num_nodes"], g["batch_share"]) for g in groups] == [
        ("cs2", 2, 32),
        ("pcm", 2, 32),
    ]
    assert emulated["step_time_s"] == max(g["node_time_s"] for g in groups)
    assert min(g["idle_s"] for g in groups) == 0.0
    assert emulated["energy_j"] > sum(g["energy_j"] for g in groups)


def test_throughput_balance_runs_unequal_shares(ray_session, tmp_path):
    config = load_config(
        overrides={
            "model.name": "mlp-digits",
            "node_groups": "cs2:1,pcm:1",
            "balance": "throughput",
            "batch_size": 64,
            "num_steps": 3,
        }
    )
    report = train(config, progress=False)
    groups = report.to_json()["emulated"]["groups"]
    shares = [g["batch_share"] for g in groups]
    assert sum(shares) == 64 and shares[0] > shares[1] >= 1
    assert all(torch.isfinite(torch.tensor(s.loss)) for s in report.steps)
    trace = tmp_path / "trace.json"
    report.write_trace(str(trace))
    text = trace.read_text()
    assert "group 0 (cs2) node" in text and "group 1 (pcm) node" in text


def test_fp16_and_fp32_groups_each_get_their_format(ray_session):
    common = {"model.name": "mlp-digits", "batch_size": 32, "num_steps": 3, "seed": 2}
    mixed = train(
        load_config(
            overrides={
                **common,
                "node_groups": [
                    {"num_nodes": 1, "backend": {"kind": "cs2", "precision": "fp16"}},
                    {"num_nodes": 1, "backend": {"kind": "cs2"}},
                ],
            }
        ),
        progress=False,
    )
    received = [n["weight_bytes_received"] for n in mixed.traffic["nodes"]]
    # Node 0 took the weights in fp16, node 1 in fp32: half the bytes.
    assert 2 * received[0] == received[1]
    # Both trained: SwarmX summed the gradients of both formats.
    assert mixed.steps[-1].loss < mixed.steps[0].loss
    precisions = [g.step.workload.precision for g in mixed.grouped.groups]
    assert precisions == ["fp16", "fp32"]
