"""Modes are strategy objects: no code outside their classes compares a mode's name.

The config keeps each mode's name (``Literal[...]``) for YAML and the CLI and resolves it once
to its strategy object; everything else asks that object. This test parses every module of
``nodes/`` and ``emulator/`` and fails on a comparison (``==``, ``!=``, ``in``, ``match``)
against a mode name, so a new string switch cannot creep back in.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from nodes.pcm.modes import BACKWARD_PASSES, FORWARD_PASSES, OPERATING_MODES
from nodes.photonic.training import TRAINING_METHODS

ROOT = Path(__file__).resolve().parents[2]
#: Every name a config resolves to a strategy object.
MODE_NAMES = {*TRAINING_METHODS, *OPERATING_MODES, *FORWARD_PASSES, *BACKWARD_PASSES}
#: Where the strategy classes live: they name themselves (``name = "ffm"``), nothing more.
STRATEGY_MODULES = {"nodes/photonic/training.py", "nodes/pcm/modes.py"}


def _mode_constants(node: ast.AST) -> list[str]:
    """Mode names among the string constants of ``node`` (a tuple/list/set is searched)."""
    if isinstance(node, ast.Constant) and node.value in MODE_NAMES:
        return [node.value]
    if isinstance(node, ast.Tuple | ast.List | ast.Set):
        return [name for element in node.elts for name in _mode_constants(element)]
    return []


def mode_name_comparisons(source: str) -> list[tuple[int, str]]:
    """(line, mode name) of every comparison against a mode name in ``source``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare):
            for operand in [node.left, *node.comparators]:
                found += [(node.lineno, name) for name in _mode_constants(operand)]
        elif isinstance(node, ast.MatchValue):
            found += [(node.lineno, name) for name in _mode_constants(node.value)]
    return found


def _modules() -> list[Path]:
    return sorted(p for d in ("nodes", "emulator") for p in (ROOT / d).rglob("*.py"))


def test_the_scan_sees_the_sources_and_catches_a_string_switch():
    assert len(_modules()) > 30
    switch = 'if config.training == "dfa":\n    pass\nelif mode in ("streaming", "x"):\n    pass\n'
    assert mode_name_comparisons(switch) == [(1, "dfa"), (3, "streaming")]
    matched = 'match method:\n    case "ffm":\n        pass\n'
    assert mode_name_comparisons(matched) == [(2, "ffm")]
    # Naming a mode (a default, a Literal, an override) is not a switch.
    assert mode_name_comparisons('mode = "streaming"\nf(training="dfa")\n') == []


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_module_switches_on_a_mode_name(path: Path):
    relative = path.relative_to(ROOT).as_posix()
    if relative in STRATEGY_MODULES:
        return
    found = mode_name_comparisons(path.read_text())
    assert not found, (
        f"{relative} compares mode names {found}; ask the mode's strategy object "
        "(nodes/photonic/training.py, nodes/pcm/modes.py) instead."
    )
