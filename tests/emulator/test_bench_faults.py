"""The short version of benchmarks/bench_faults.py: random faults, every one recovered
bit-identically (the benchmark's own check; no time is asserted)."""

from __future__ import annotations

import pytest

from benchmarks.bench_faults import main

pytestmark = pytest.mark.integration


def test_random_faults_are_all_recovered_bit_identically(ray_session, capsys):
    result = main(["--faults", "2", "--steps", "4", "--overhead-repeats", "0"])
    assert result["faults_injected"] == 2
    assert result["faults_recovered"] == 2
    assert result["bit_identical"] is True
    assert len(result["restarts"]) >= 2
    assert "recovered 2/2, bit-identical: True" in capsys.readouterr().out
