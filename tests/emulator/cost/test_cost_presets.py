from __future__ import annotations

from pathlib import Path

import pytest

from core.presets import PRESET_DIR, list_presets, load_hardware


def test_bundled_presets_carry_reference_figures():
    assert {"cs2", "cs3"} <= set(list_presets())
    assert "pcm_ibm64" not in list_presets()  # a node preset sharing the folder
    cs2, cs3 = load_hardware("cs2"), load_hardware("cs3")
    assert cs2.wafer.sram_bytes == 40e9 and cs3.wafer.sram_bytes == 44e9
    assert 16 * cs2.wafer.peak_flops_16bit == pytest.approx(120e15)  # Andromeda
    assert cs2.wafer.io_bandwidth_bytes_per_s == pytest.approx(1.2e12 / 8)
    assert cs2.swarmx.fan_out == 4
    assert cs2.swarmx.port_bandwidth_bytes_per_s == pytest.approx(100e9 / 8)
    assert (cs2.swarmx.max_systems, cs3.swarmx.max_systems) == (192, 2048)
    assert max(cs2.memoryx.capacity_options_bytes) == pytest.approx(2.4e15)
    assert max(cs3.memoryx.capacity_options_bytes) == pytest.approx(1.2e15)


def test_every_figure_in_a_preset_cites_a_source():
    for name in ("cs2", "cs3"):
        for line in (PRESET_DIR / f"{name}.yaml").read_text().splitlines():
            stripped = line.strip()
            if not stripped or stripped.startswith("#") or stripped.endswith(":"):
                continue
            if stripped.startswith(("name:", "description:")):
                continue
            assert "#" in stripped, f"{name}.yaml: {stripped!r} has no source comment"
            comment = stripped.split("#", 1)[1]
            assert any(tag in comment for tag in ("vendor", "derived", "assumed", "secondary")), (
                f"{name}.yaml: {stripped!r} does not say where its figure comes from"
            )


def test_overrides_apply_before_validation():
    config = load_hardware("cs2", {"wafer.compute_efficiency": 0.4, "swarmx.max_systems": 8})
    assert config.wafer.compute_efficiency == 0.4
    assert config.swarmx.max_systems == 8


def test_negative_bandwidth_names_field_and_value():
    with pytest.raises(
        ValueError, match=r"wafer\.io_bandwidth_bytes_per_s = -5\.0 .*greater than 0"
    ):
        load_hardware("cs2", {"wafer.io_bandwidth_bytes_per_s": -5.0})
    with pytest.raises(ValueError, match=r"memoryx\.bandwidth_bytes_per_s = -1\.0"):
        load_hardware("cs3", {"memoryx.bandwidth_bytes_per_s": -1.0})


def test_unknown_preset_lists_the_presets():
    with pytest.raises(ValueError, match=r"Unknown hardware preset 'cs9'; choose one of cs2, cs3"):
        load_hardware("cs9")
    with pytest.raises(ValueError, match=r"Unknown hardware preset 'pcm_ibm64'"):
        load_hardware("pcm_ibm64")


def test_unknown_override_key_lists_valid_keys():
    with pytest.raises(ValueError, match=r"wafer\.bogus.*valid keys are"):
        load_hardware("cs2", {"wafer.bogus": 1.0})
    with pytest.raises(ValueError, match=r"'nope\.x'.*sections are: wafer, memoryx, swarmx"):
        load_hardware("cs2", {"nope.x": 1.0})


def test_a_user_copy_is_loaded_by_path(tmp_path: Path):
    text = (PRESET_DIR / "cs2.yaml").read_text().replace("max_systems: 192", "max_systems: 7")
    path = tmp_path / "mine.yaml"
    path.write_text(text)
    assert load_hardware(path).swarmx.max_systems == 7
    path.write_text(text.replace("power_w: 23000.0", "power_w: -23000.0"))
    with pytest.raises(ValueError, match=r"wafer\.power_w = -23000\.0"):
        load_hardware(path)
