"""What the driver imports before it launches a run: torch's symbolic-shape machinery is
about 1.5 s of CPU (torch._dynamo, sympy) on the way to the first step, and a run of a zoo
model needs none of it."""

from __future__ import annotations

import subprocess
import sys

SYMBOLIC = ("sympy", "torch._dynamo", "torch.fx.experimental.symbolic_shapes")


def test_a_zoo_run_imports_no_symbolic_shapes_before_launch():
    """Everything ``train`` does before ``launch`` (the deferred build, the shape checks,
    the cost engine's fit check) and what ``launch`` does to the layers in the driver."""
    code = f"""
import copy, sys
import emulator.train as train_module
from emulator.config import load_config
from nodes.worker import strip_parameters

class Launched(Exception):
    pass

def launch(config, layers, dataset=None, *, spans=None):
    [strip_parameters(copy.deepcopy(layer)) for layer in layers]
    raise Launched

train_module.launch = launch
config = load_config(overrides={{"model.name": "mlp-digits", "num_nodes": 4}})
try:
    train_module.train(config, progress=False)
except Launched:
    print(sorted(m for m in {SYMBOLIC!r} if m in sys.modules))
"""
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
