"""Cluster-level checks that span the optimizer and MemoryX sections."""

from __future__ import annotations

import pytest

from emulator.config import load_config


def test_skip_policy_is_refused_beside_a_disk_tier():
    with pytest.raises(ValueError, match=r"optimizer.nonfinite = 'skip' is not supported"):
        load_config(
            overrides={
                "optimizer": {"name": "adam", "lr": 1e-3, "nonfinite": "skip"},
                "memoryx": {"ram_budget_bytes": 10**8, "spill_dir": "/tmp"},
            }
        )


def test_skip_policy_is_refused_with_several_servers():
    # Each server would skip the step in its own layers only: the model would tear.
    with pytest.raises(ValueError, match=r"'skip' is not supported with memoryx.num_servers = 2"):
        load_config(
            overrides={
                "optimizer": {"name": "adam", "lr": 1e-3, "nonfinite": "skip"},
                "memoryx": {"num_servers": 2},
            }
        )
