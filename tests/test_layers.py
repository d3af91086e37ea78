"""The floors hold: packages below the top floor load nothing of ``emulator``."""

from __future__ import annotations

import json
import subprocess
import sys


def _modules_loaded_by(statement: str) -> list[str]:
    code = f"import json, sys\n{statement}\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def test_lower_floors_load_no_emulator_module():
    loaded = _modules_loaded_by(
        "import core, nodes.cs2, nodes.pcm, nodes.photonic, nodes.registry, memoryx, swarmx, proto"
    )
    assert "nodes.registry" in loaded  # the import really ran
    assert [m for m in loaded if m == "emulator" or m.startswith("emulator.")] == []


def test_core_loads_no_service_or_backend_package():
    loaded = _modules_loaded_by("import core.config, core.cost.engine, core.data, core.zoo")
    higher = ("proto", "memoryx", "swarmx", "nodes", "emulator")
    assert [m for m in loaded if m.split(".")[0] in higher] == []
