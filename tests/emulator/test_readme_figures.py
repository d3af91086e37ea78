"""The README's figures: the markers agree with the registry, and the fast figures reproduce.

The slow figures (training runs, minutes each) are checked by
``python benchmarks/readme_figures.py --check``; CI runs the fast subset here.
"""

from __future__ import annotations

import importlib.util
import io
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


figures = _load("readme_figures")
registry = sys.modules["figures_registry"]


def _echo_figure(name: str, text: str, fast: bool = True):
    """A figure whose command prints ``text`` (no JSON) and whose block is that text."""
    command = registry.Command(("python", "-c", f"print({text!r})"), json=False)
    return registry.Figure(name, (command,), lambda outputs: outputs[0].stdout, fast=fast)


def _readme(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "README.md"
    path.write_text(body)
    return path


ECHO = "python -c print('42 bytes')"


def test_every_readme_figure_is_registered_and_every_command_is_shown():
    blocks = figures.parse_blocks((ROOT / "README.md").read_text())
    figures.check_markers(blocks, registry.FIGURES)
    assert {b.name for b in blocks} == set(registry.FIGURES)
    assert any(f.fast for f in registry.FIGURES.values())
    assert any(not f.fast for f in registry.FIGURES.values())


def test_fast_readme_figures_reproduce_exactly():
    out = io.StringIO()
    # The fast figures' commands are independent processes: one per core at a time.
    status = figures.run("check", fast=True, out=out, jobs=max(2, os.cpu_count() or 2))
    assert status == 0, out.getvalue()
    assert " 0 differ." in out.getvalue()


def test_check_reports_a_stale_figure_with_a_diff_and_write_fixes_it(tmp_path):
    readme = _readme(
        tmp_path,
        f"Run `{ECHO}`:\n\n<!-- figure: echo -->\n\n41 bytes\n\n<!-- /figure: echo -->\n\nEnd.\n",
    )
    registered = {"echo": _echo_figure("echo", "42 bytes")}
    out = io.StringIO()
    assert figures.run("check", readme=readme, figures=registered, out=out) == 1
    assert "-41 bytes" in out.getvalue() and "+42 bytes" in out.getvalue()
    assert figures.run("write", readme=readme, figures=registered, out=io.StringIO()) == 0
    assert readme.read_text() == (
        f"Run `{ECHO}`:\n\n<!-- figure: echo -->\n\n42 bytes\n\n<!-- /figure: echo -->\n\nEnd.\n"
    )
    assert figures.run("check", readme=readme, figures=registered, out=io.StringIO()) == 0


def test_fast_and_only_select_figures(tmp_path):
    readme = _readme(
        tmp_path,
        f"`{ECHO}`\n<!-- figure: a -->\nold\n<!-- /figure: a -->\n"
        f"`{ECHO}`\n<!-- figure: b -->\nold\n<!-- /figure: b -->\n",
    )
    registered = {"a": _echo_figure("a", "42 bytes"), "b": _echo_figure("b", "42 bytes", False)}
    out = io.StringIO()
    figures.run("write", readme=readme, figures=registered, fast=True, out=out)
    assert "1 figure(s) regenerated; 1 rewrote: a." in out.getvalue()
    figures.run("write", readme=readme, figures=registered, only=["b"], out=io.StringIO())
    assert readme.read_text().count("42 bytes\n\n<!-- /figure") == 2
    with pytest.raises(figures.MarkerError, match="--only c: no such figure"):
        figures.run("check", readme=readme, figures=registered, only=["c"])


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (f"`{ECHO}`\n<!-- figure: echo -->\nx\n", "is never closed"),
        (f"`{ECHO}`\n<!-- figure: echo -->\nx\n<!-- /figure: other -->\n", "closes no open"),
        ("<!-- figure: echo -->\nx\n<!-- /figure: echo -->\n", "does not show its command"),
        (
            f"`{ECHO}`\n<!-- figure: echo -->\n<!-- /figure: echo -->\n"
            "<!-- figure: stray -->\n<!-- /figure: stray -->\n",
            "does not list",
        ),
        (f"`{ECHO}`\n<!-- figure: Echo -->\nx\n<!-- /figure: echo -->\n", "not a figure marker"),
        (
            f"`{ECHO}`\n<!-- figure: echo -->\n<!-- /figure: echo -->\n"
            "<!-- figure: echo -->\n<!-- /figure: echo -->\n",
            "has 2 blocks",
        ),
    ],
)
def test_markers_and_registry_must_agree(tmp_path, body, message):
    readme = _readme(tmp_path, body)
    with pytest.raises(figures.MarkerError, match=message):
        figures.run("check", readme=readme, figures={"echo": _echo_figure("echo", "42 bytes")})


def test_a_registry_entry_without_a_block_is_an_error(tmp_path):
    readme = _readme(tmp_path, "No figures here.\n")
    with pytest.raises(figures.MarkerError, match="has no block"):
        figures.run("check", readme=readme, figures={"echo": _echo_figure("echo", "x")})


@pytest.mark.parametrize("jobs", [1, 2])
def test_a_failing_command_or_renderer_is_reported_and_the_other_figures_still_run(tmp_path, jobs):
    failing = registry.Command(("python", "-c", "raise SystemExit(3)"), json=False)
    registered = {
        "a": _echo_figure("a", "42 bytes"),
        "b": registry.Figure("b", (failing,), lambda outputs: "never"),
        "c": registry.Figure("c", _echo_figure("c", "42 bytes").commands, lambda o: {}["x"]),
        "d": _echo_figure("d", "42 bytes"),
    }
    readme = _readme(
        tmp_path,
        "".join(
            f"`{cmd}`\n<!-- figure: {name} -->\nold\n<!-- /figure: {name} -->\n"
            for name, cmd in [
                ("a", ECHO),
                ("b", "python -c raise SystemExit(3)"),
                ("c", ECHO),
                ("d", ECHO),
            ]
        ),
    )
    out = io.StringIO()
    assert figures.run("write", readme=readme, figures=registered, out=out, jobs=jobs) == 1
    assert "figure b: `python -c raise SystemExit(3)` exited 3" in out.getvalue()
    assert "figure c: its renderer" in out.getvalue() and "KeyError" in out.getvalue()
    blocks = {
        b.name: b.content(readme.read_text().split("\n"))
        for b in figures.parse_blocks(readme.read_text())
    }
    assert blocks == {"a": "42 bytes", "b": "old", "c": "old", "d": "42 bytes"}
