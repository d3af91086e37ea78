"""ClusterConfig asks the backend whether MemoryX's weight sparsity means anything on it."""

from __future__ import annotations

import pytest

from emulator.config import ClusterConfig, load_config
from memoryx.sparsity import Sparsity
from nodes.photonic.backend import PhotonicBackend


def _load(backend: dict, sparsity: float | None = 0.9) -> ClusterConfig:
    overrides = {f"backend.{key}": value for key, value in backend.items()}
    if sparsity is not None:
        overrides["sparsity.sparsity"] = sparsity
    return load_config(overrides={"model.name": "mlp-digits", **overrides})


@pytest.mark.parametrize("training", ["backprop", "ffm"])
def test_photonic_phase_training_rejects_sparsity_naming_both_fields(training):
    with pytest.raises(ValueError) as info:
        _load({"kind": "photonic", "training": training})
    message = str(info.value)
    assert message.startswith("sparsity with backend.training")
    assert f"backend.training = {training!r}" in message
    assert "'dfa'" in message  # what works instead


def test_photonic_default_training_rejects_sparsity_built_in_python():
    with pytest.raises(ValueError, match="sparsity with backend.training = 'backprop'"):
        ClusterConfig(backend=PhotonicBackend.Config(), sparsity=Sparsity.Config(sparsity=0.9))


@pytest.mark.parametrize(
    "backend",
    [{"kind": "cs2"}, {"kind": "pcm"}, {"kind": "photonic", "training": "dfa"}],
    ids=["cs2", "pcm", "photonic-dfa"],
)
def test_weight_training_backends_take_sparsity(backend):
    config = _load(backend)
    assert config.sparsity is not None and config.sparsity.sparsity == 0.9
    assert config.backend.kind == backend["kind"]


@pytest.mark.parametrize("training", ["backprop", "ffm"])
def test_photonic_phase_training_stays_valid_when_dense(training):
    config = _load({"kind": "photonic", "training": training}, sparsity=None)
    assert config.sparsity is None
