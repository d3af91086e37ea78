"""In silico vs in situ on photonic nodes: a twin-trained network deployed on the hardware, and ffm.

    python examples/photonic_in_situ.py [--steps 80] [--lr 0.02] [--seed 0] [--json PATH]

A 64-16-10 MLP on the digits, 16-mode meshes, 1 node, Adam, batch 128, on the
real cluster (``emulator.train.train``), three accuracies on the 359 test digits:

- trained by backprop on the ideal digital twin, evaluated on the twin
  (``config.backend.twin()``, in this process, with the node's own code);
- the same phases evaluated on the physical node (what ``backprop`` reports);
- trained in situ by ``ffm`` on the physical node.

``tests/nodes/test_photonic_integration.py`` asserts the shape of this result
(a loss of at least 10 points on deployment, ffm within 3 points of the twin).
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

import torch  # noqa: E402
from torch import nn  # noqa: E402

from core.atomic import write_json_atomic  # noqa: E402
from emulator.compare import _worker  # noqa: E402
from emulator.config import load_config  # noqa: E402
from emulator.prepare import prepare_layers  # noqa: E402
from emulator.train import train  # noqa: E402


def mlp(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Sequential(nn.Linear(64, 16), nn.ReLU()), nn.Linear(16, 10))


#: The device each run deploys on: as a real chip is deployed (after calibration), or the
#: worst case without calibration (the FFM paper's in-silico designs met it).
DEVICES = {"calibrated": {}, "uncalibrated": {"device": {"calibration": None}}}


def photonic_config(
    training: str, *, steps: int, lr: float, mesh_size: int, seed: int, device: str
):
    backend = {"kind": "photonic", "training": training, "mesh_size": mesh_size}
    return load_config(
        overrides={
            "backend": {**backend, **DEVICES[device]},
            "num_nodes": 1,
            "batch_size": 128,
            "num_steps": steps,
            "seed": seed,
            "optimizer": {"name": "adam", "lr": lr},
        }
    )


def twin_accuracy(config, weights, seed: int) -> float:
    """Trained phases evaluated on the ideal twin, in this process (the node's own code path)."""
    layers, dataset = prepare_layers(config, mlp(seed))
    worker = _worker(config, layers, dataset, config.backend.twin().build(), rank=0, num_nodes=1)
    for index, params in enumerate(weights):
        result = worker.evaluate(index, 0, params)
    return result.num_correct / result.num_targets


def in_silico_vs_in_situ(
    *, steps: int, lr: float, mesh_size: int = 16, seed: int = 0, device: str = "calibrated"
) -> dict:
    torch.set_num_threads(1)
    settings = {"steps": steps, "lr": lr, "mesh_size": mesh_size, "seed": seed, "device": device}
    backprop_config = photonic_config("backprop", **settings)
    backprop = train(backprop_config, model=mlp(seed), progress=False)
    ffm = train(photonic_config("ffm", **settings), model=mlp(seed), progress=False)
    return {
        **settings,
        "twin_accuracy": twin_accuracy(backprop.config, backprop.final_weights, seed),
        "deployed_accuracy": backprop.evals[-1].accuracy,
        "ffm_accuracy": ffm.evals[-1].accuracy,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=80, help="training steps of each run")
    parser.add_argument("--lr", type=float, default=0.02, help="Adam learning rate")
    parser.add_argument("--mesh-size", type=int, default=16, help="MZI mesh size, modes")
    parser.add_argument("--seed", type=int, default=0, help="model init, data order, device")
    parser.add_argument(
        "--device", choices=sorted(DEVICES), default="calibrated", help="deployed device"
    )
    parser.add_argument("--json", metavar="PATH", help="write the result as JSON (atomically)")
    args = parser.parse_args(argv)
    result = in_silico_vs_in_situ(
        steps=args.steps, lr=args.lr, mesh_size=args.mesh_size, seed=args.seed, device=args.device
    )
    for key in ("twin_accuracy", "deployed_accuracy", "ffm_accuracy"):
        print(f"{key:18} {100 * result[key]:.2f}%")
    if args.json:
        write_json_atomic(args.json, result)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
