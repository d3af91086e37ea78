"""A partial ``device:`` in YAML overlays the realistic preset instead of silently idealizing it."""

from __future__ import annotations

import pytest

from core.config import to_dict
from emulator.config import load_config
from nodes.photonic.backend import PhotonicBackend
from nodes.photonic.device import PhotonicCore
from nodes.photonic.nonideal import PhaseError
from nodes.photonic.preset import load_preset

SECTIONS = (
    "phase_quantization",
    "phase_error",
    "gain_error",
    "crosstalk",
    "insertion_loss",
    "splitter_imbalance",
    "detection_noise",
    "readout",
    "calibration",
    "cost",
)


def backend_from_yaml(tmp_path, text: str) -> PhotonicBackend.Config:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return load_config(path).backend


def test_sections_not_given_keep_the_preset(tmp_path):
    backend = backend_from_yaml(
        tmp_path, "backend:\n  kind: photonic\n  device:\n    phase_error: {sigma_rad: 0.1}\n"
    )
    preset = load_preset()
    assert type(backend.device) is PhotonicCore.Config
    assert backend.device.phase_error == PhaseError.Config(sigma_rad=0.1)
    for name in SECTIONS:
        if name != "phase_error":
            assert getattr(backend.device, name) == getattr(preset, name), name
            assert getattr(backend.device, name) is not None


def test_a_null_section_is_ideal_and_the_rest_stay_realistic(tmp_path):
    backend = backend_from_yaml(
        tmp_path, "backend:\n  kind: photonic\n  mesh_size: 8\n  device:\n    readout: null\n"
    )
    assert backend.device.readout is None
    assert backend.device.phase_error == load_preset().phase_error
    assert backend.device.mesh_size == 8  # the backend's mesh_size still sets the device's


def test_an_empty_device_is_the_preset_and_configs_round_trip():
    config = load_config(overrides={"backend": {"kind": "photonic", "device": {}}})
    assert config.backend.device == load_preset()
    ideal_sections = load_config(
        overrides={"backend": {"kind": "photonic", "device": dict.fromkeys(SECTIONS[:-1])}}
    )
    assert ideal_sections.backend.device == load_preset().twin()
    for original in (config, ideal_sections):
        again = load_config(overrides={"backend": to_dict(original.backend)})
        assert again.backend == original.backend


def test_ideal_and_twin_still_have_no_errors():
    ideal = PhotonicBackend.Config.ideal(mesh_size=8)
    assert ideal.device == PhotonicCore.Config(mesh_size=8)
    partial = load_config(
        overrides={"backend": {"kind": "photonic", "device": {"crosstalk": {"coupling": 0.01}}}}
    ).backend
    assert partial.twin().device == PhotonicCore.Config(mesh_size=64, cost=partial.device.cost)


def test_a_bad_value_in_a_partial_device_names_the_field():
    with pytest.raises(ValueError, match=r"phase_error\.sigma_rad = -1\.0 is not valid"):
        load_config(
            overrides={
                "backend": {"kind": "photonic", "device": {"phase_error": {"sigma_rad": -1.0}}}
            }
        )
    with pytest.raises(ValueError, match=r"Unknown config key backend\.device\.phase_eror"):
        load_config(overrides={"backend": {"kind": "photonic", "device": {"phase_eror": None}}})
