"""runtime.placement on a 3-raylet cluster (all on 127.0.0.1), joined through
runtime.address as ``wafer train --address`` does: spread vs pack, the same losses
as one host."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.emulator.test_cli import ENV, REPO

pytestmark = pytest.mark.integration


def test_spread_uses_every_raylet_and_trains_as_one_host():
    result = subprocess.run(
        [sys.executable, "-m", "tests.emulator.placement_run"],
        cwd=REPO,
        env={**ENV, "RAY_AUTH_MODE": "disabled"},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    line = next(x for x in result.stdout.splitlines() if x.startswith("RESULT "))
    found = json.loads(line.removeprefix("RESULT "))
    raylets = set(found["raylets"])
    assert len(raylets) == 3

    def used(strategy: str) -> set[str]:
        placement = found[strategy]["placement"]
        components = [placement["memoryx"], *placement["swarmx"].values(), *placement["nodes"]]
        assert len(placement["nodes"]) == 4 and len(placement["swarmx"]) == 3
        # Services bind their Ray node's address: loopback on every raylet here.
        assert all(c["host"] == "127.0.0.1" for c in components)
        return {c["ray_node_id"] for c in components}

    assert used("spread") == raylets
    assert len(used("pack")) == 1
    assert found["spread"]["losses"] == found["pack"]["losses"]
