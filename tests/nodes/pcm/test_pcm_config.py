"""The chip preset file and the top-level PCM config."""

import pytest

from core.config import from_dict
from nodes.pcm.config import PRESET_DIR, PcmConfig, load_preset


def test_preset_equals_dataclass_defaults():
    assert load_preset("pcm_ibm64") == PcmConfig()


def test_every_preset_value_has_a_source_comment():
    for line in (PRESET_DIR / "pcm_ibm64.yaml").read_text().splitlines():
        code = line.split("#", 1)[0]
        key, _, value = code.partition(":")
        if value.strip():  # a "key: value" line, not a section header or a comment
            assert "#" in line, f"no source comment for {key.strip()!r}: {line!r}"


def test_unknown_preset_lists_the_available_ones():
    with pytest.raises(ValueError, match=r"'nope' not found .* available: pcm_ibm64"):
        load_preset("nope")


def test_nested_validation_names_the_field_path():
    with pytest.raises(ValueError, match=r"^periphery\.adc_bits = 0 is not valid"):
        from_dict(PcmConfig, {"periphery": {"adc_bits": 0}})
    with pytest.raises(ValueError, match=r"^tile\.rows = -1 is not valid"):
        from_dict(PcmConfig, {"tile": {"rows": -1}})


def test_every_config_builds():
    config = PcmConfig()
    device = config.device.build()
    tile = config.tile.build()
    assert device.g_max == 25.0 and tile.rows == 256
    assert config.periphery.build().adc.step == pytest.approx(10.0 / 127)
    assert config.cost.build().clock_s > 0
    assert config.weight_stationary.build(tile).num_arrays == 64
    assert config.training.build().config.forward == "analog"
