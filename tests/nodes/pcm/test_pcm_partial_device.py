"""A partial PCM ``device:`` or ``periphery:`` in YAML keeps the chip preset for what it omits.

PcmBackend.Config's defaults are the pcm_ibm64 preset (test_pcm_config), and no section is
optional, so a partial mapping cannot idealize a section it does not mention.
"""

from __future__ import annotations

import dataclasses

from emulator.config import load_config
from nodes.pcm.config import load_preset


def test_omitted_sections_and_fields_keep_the_preset(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(
        "backend:\n  kind: pcm\n  device:\n    drift: {scale: 2.0}\n  periphery: {adc_bits: 6}\n"
    )
    backend = load_config(path).backend
    chip = load_preset()
    assert backend.device == dataclasses.replace(
        chip.device, drift=dataclasses.replace(chip.device.drift, scale=2.0)
    )
    assert backend.periphery == dataclasses.replace(chip.periphery, adc_bits=6)
    assert backend.tile == chip.tile and backend.cost == chip.cost
