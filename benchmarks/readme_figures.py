"""Regenerate every figure in README.md from its seeded command, and report any that differ.

    python benchmarks/readme_figures.py --check            # exit 1 and a diff if any differ
    python benchmarks/readme_figures.py --write            # rewrite the README blocks in place
    python benchmarks/readme_figures.py --check --fast     # the subset CI runs (a few minutes)
    python benchmarks/readme_figures.py --check --only pcm-drift compare-backends
    python benchmarks/readme_figures.py --list             # names, fast/slow, commands

Each figure in README.md sits between two HTML comments,

    <!-- figure: NAME -->
    ...generated text: a table, a code block or a sentence...
    <!-- /figure: NAME -->

and ``benchmarks/figures_registry.py`` maps NAME to the commands that produce it
and a renderer that turns their output (``--json`` file, else stdout) into the
exact text between the markers. The commands are seeded, and everything they
report here (losses, accuracies, bytes, emulated times) is bitwise deterministic,
so a rerun reproduces each block exactly. Wall times and benchmark ratios are
measurements, not figures: the README marks them with machine and date, and
this script leaves them alone.

Strict: a marker without a registry entry, an entry without a marker, a marker
that is not closed, or a command that the README does not show before the end
of its figure is an error (exit 2) before anything runs. A command that fails
or a renderer that no longer fits its output is reported (exit 1) and the
other figures still run; ``--write`` writes every figure that rendered.

``--save DIR`` keeps every command's stdout and JSON; ``--from DIR`` renders from
such a directory instead of running (it checks the renderers and the markers,
not the figures).
"""

from __future__ import annotations

import argparse
import difflib
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from figures_registry import FIGURES, Figure, Output  # noqa: E402

from core.atomic import write_bytes_atomic  # noqa: E402

README = ROOT / "README.md"
_BEGIN = re.compile(r"^<!-- figure: ([a-z0-9][a-z0-9-]*) -->$")
_END = re.compile(r"^<!-- /figure: ([a-z0-9][a-z0-9-]*) -->$")


class MarkerError(ValueError):
    """The README's markers and the registry disagree."""


@dataclass
class Block:
    name: str
    begin: int  # line index of the begin marker
    end: int  # line index of the end marker
    context: str  # README text since the previous figure's end, through this figure's end

    def content(self, lines: list[str]) -> str:
        return _strip_blank("\n".join(lines[self.begin + 1 : self.end]))


def _strip_blank(text: str) -> str:
    return text.strip("\n")


def parse_blocks(text: str) -> list[Block]:
    """The README's figure blocks, in order; MarkerError on anything malformed."""
    lines = text.split("\n")
    blocks: list[Block] = []
    open_name, open_at, previous_end = None, 0, 0
    for index, line in enumerate(lines):
        begin, end = _BEGIN.match(line.strip()), _END.match(line.strip())
        if begin:
            if open_name is not None:
                raise MarkerError(
                    f"README.md line {index + 1}: figure {begin[1]!r} begins inside figure "
                    f"{open_name!r} (line {open_at + 1}); close it with <!-- /figure: {open_name} -->."
                )
            open_name, open_at = begin[1], index
        elif end:
            if end[1] != open_name:
                raise MarkerError(
                    f"README.md line {index + 1}: <!-- /figure: {end[1]} --> closes no open "
                    f"figure {end[1]!r}" + (f" (open: {open_name!r})." if open_name else ".")
                )
            context = "\n".join(lines[previous_end:index])
            blocks.append(Block(open_name, open_at, index, context))
            open_name, previous_end = None, index + 1
        elif re.match(r"<!--\s*/?\s*figure", line.strip()):
            raise MarkerError(
                f"README.md line {index + 1}: {line.strip()!r} is not a figure marker; write "
                "<!-- figure: NAME --> or <!-- /figure: NAME --> (lowercase, digits, dashes)."
            )
    if open_name is not None:
        raise MarkerError(
            f"README.md line {open_at + 1}: figure {open_name!r} is never closed; add "
            f"<!-- /figure: {open_name} --> after its block."
        )
    return blocks


def _normalize(text: str) -> str:
    return " ".join(text.replace("`", " ").split())


def check_markers(blocks: list[Block], figures: dict[str, Figure]) -> None:
    """Every marker has an entry, every entry one marker, and each command is shown."""
    names = [b.name for b in blocks]
    problems = []
    for name in sorted({n for n in names if names.count(n) > 1}):
        problems.append(f"figure {name!r} has {names.count(name)} blocks in README.md; keep one.")
    for name in sorted(set(names) - set(figures)):
        problems.append(
            f"README.md has a block for figure {name!r}, which benchmarks/figures_registry.py "
            "does not list; register it or remove the markers."
        )
    for name in sorted(set(figures) - set(names)):
        problems.append(
            f"benchmarks/figures_registry.py lists figure {name!r}, which README.md has no "
            f"block for; add <!-- figure: {name} --> ... <!-- /figure: {name} --> or drop the entry."
        )
    for block in blocks:
        figure = figures.get(block.name)
        if figure is None:
            continue
        context = _normalize(block.context)
        for command in figure.commands:
            if _normalize(command.shown) not in context:
                problems.append(
                    f"figure {block.name!r}: README.md does not show its command "
                    f"`{command.shown}` between the previous figure and this one's end; "
                    "write it next to the figure, exactly (line breaks are fine)."
                )
    if problems:
        raise MarkerError("\n".join(problems))


class CommandFailed(RuntimeError):
    pass


class Runner:
    """Runs each distinct command once per invocation (figures may share a run)."""

    def __init__(self, save: Path | None = None, source: Path | None = None, verbose=True):
        self.save, self.source, self.verbose = save, source, verbose
        self._done: dict[str, Output] = {}
        self._failed: dict[str, CommandFailed] = {}

    @staticmethod
    def key(argv: tuple[str, ...]) -> str:
        return hashlib.sha256("\0".join(argv).encode()).hexdigest()[:16]

    def prefetch(self, commands, jobs: int) -> None:
        """Runs the distinct ``commands`` ``jobs`` at a time; ``output`` then returns each
        one's output (or raises its failure) without running it again."""
        unique = {self.key(command.argv): command for command in commands}

        def fetch(command) -> None:
            try:
                self.output(command)
            except CommandFailed as exc:
                self._failed[self.key(command.argv)] = exc

        with ThreadPoolExecutor(max_workers=jobs) as pool:
            list(pool.map(fetch, unique.values()))

    def output(self, command) -> Output:
        key = self.key(command.argv)
        if key in self._failed:
            raise self._failed[key]
        if key not in self._done:
            self._done[key] = self._load(command, key) if self.source else self._run(command, key)
        return self._done[key]

    def _load(self, command, key: str) -> Output:
        stdout = self.source / f"{key}.out"
        if not stdout.exists():
            raise CommandFailed(f"--from {self.source}: no saved output of `{command.shown}`.")
        data = self.source / f"{key}.json"
        return Output(stdout.read_text(), json.loads(data.read_text()) if data.exists() else None)

    def _run(self, command, key: str) -> Output:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        env.setdefault("GRPC_VERBOSITY", "ERROR")
        with tempfile.TemporaryDirectory(prefix="readme-figure-") as tmp:
            json_path = Path(tmp) / "out.json"
            argv = command.executable_argv(str(json_path))
            if self.verbose:
                print(f"  running: {command.shown}", file=sys.stderr, flush=True)
            started = time.monotonic()
            proc = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True)
            if self.verbose:
                print(f"    {time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)
            if proc.returncode not in command.ok_returncodes:
                raise CommandFailed(
                    f"`{command.shown}` exited {proc.returncode}:\n{proc.stderr[-3000:]}"
                )
            data = json.loads(json_path.read_text()) if command.json else None
        if self.save:
            self.save.mkdir(parents=True, exist_ok=True)
            (self.save / f"{key}.out").write_text(proc.stdout)
            (self.save / f"{key}.cmd").write_text(command.shown + "\n")
            if data is not None:
                (self.save / f"{key}.json").write_text(json.dumps(data, indent=1))
        return Output(proc.stdout, data)


def render(figure: Figure, runner: Runner) -> str:
    outputs = [runner.output(command) for command in figure.commands]
    return _strip_blank(figure.render(outputs))


def replace_blocks(text: str, new: dict[str, str]) -> str:
    """``text`` with the content of each named block replaced (blank line either side)."""
    lines = text.split("\n")
    for block in reversed(parse_blocks(text)):
        if block.name in new:
            lines[block.begin + 1 : block.end] = ["", *new[block.name].split("\n"), ""]
    return "\n".join(lines)


def select(figures: dict[str, Figure], only: list[str] | None, fast: bool) -> list[Figure]:
    unknown = sorted(set(only or []) - set(figures))
    if unknown:
        raise MarkerError(
            f"--only {' '.join(unknown)}: no such figure; choose from {', '.join(figures)}."
        )
    chosen = [f for f in figures.values() if only is None or f.name in only]
    return [f for f in chosen if f.fast] if fast else chosen


def run(
    mode: str,
    *,
    only: list[str] | None = None,
    fast: bool = False,
    readme: Path = README,
    save: Path | None = None,
    source: Path | None = None,
    figures: dict[str, Figure] = FIGURES,
    out=sys.stdout,
    jobs: int = 1,
) -> int:
    """``mode`` is ``check`` or ``write``; returns the exit status. ``jobs`` commands run at
    a time (their outputs are seeded figures, not timings, so they may share the machine)."""
    text = readme.read_text()
    parsed = parse_blocks(text)
    check_markers(parsed, figures)
    blocks = {b.name: b for b in parsed}
    lines = text.split("\n")
    runner = Runner(save=save, source=source)
    rendered: dict[str, str] = {}
    differ: list[str] = []
    failed: list[str] = []
    selected = select(figures, only, fast)
    if jobs > 1 and source is None:
        runner.prefetch([command for figure in selected for command in figure.commands], jobs)
    for figure in selected:
        print(f"figure {figure.name} ({'fast' if figure.fast else 'slow'})", file=sys.stderr)
        try:
            rendered[figure.name] = render(figure, runner)
        except CommandFailed as exc:
            failed.append(f"figure {figure.name}: {exc}")
            continue
        except Exception as exc:  # a renderer that no longer fits its command's output
            failed.append(
                f"figure {figure.name}: its renderer in benchmarks/figures_registry.py failed "
                f"on the command's output: {type(exc).__name__}: {exc}"
            )
            continue
        current = blocks[figure.name].content(lines)
        if rendered[figure.name] != current:
            differ.append(figure.name)
            diff = difflib.unified_diff(
                current.split("\n"),
                rendered[figure.name].split("\n"),
                f"README.md [{figure.name}]",
                f"regenerated [{figure.name}]",
                lineterm="",
            )
            print("\n".join(diff), file=out)
    if mode == "write" and rendered:
        new_text = replace_blocks(text, rendered)
        if new_text != text:
            write_bytes_atomic(readme, new_text.encode())
    checked = len(rendered)
    verb = "rewrote" if mode == "write" else "differ"
    print(
        f"{checked} figure(s) regenerated; {len(differ)} {verb}"
        + (f": {', '.join(differ)}" if differ else "")
        + ".",
        file=out,
    )
    for message in failed:
        print(message, file=out)
    if failed:
        return 1
    return 1 if differ and mode == "check" else 0


def list_figures(figures: dict[str, Figure] = FIGURES) -> str:
    rows = []
    for figure in figures.values():
        rows.append(f"{figure.name}  [{'fast' if figure.fast else 'slow'}]")
        rows.extend(f"    {command.shown}" for command in figure.commands)
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--check", action="store_true", help="rerun and diff (exit 1 if any differ)")
    mode.add_argument("--write", action="store_true", help="rerun and rewrite README blocks")
    mode.add_argument("--list", action="store_true", help="list figures and their commands")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="just these figures")
    parser.add_argument("--fast", action="store_true", help="just the fast figures (CI)")
    parser.add_argument("--readme", type=Path, default=README, help="README to check or rewrite")
    parser.add_argument("--save", type=Path, metavar="DIR", help="keep each command's output")
    parser.add_argument(
        "--jobs", type=int, default=1, metavar="N", help="run N commands at a time (default 1)"
    )
    parser.add_argument(
        "--from", dest="source", type=Path, metavar="DIR", help="render saved outputs, run nothing"
    )
    args = parser.parse_args(argv)
    if args.list:
        print(list_figures())
        return 0
    try:
        return run(
            "write" if args.write else "check",
            only=args.only,
            fast=args.fast,
            readme=args.readme,
            save=args.save,
            source=args.source,
            jobs=args.jobs,
        )
    except MarkerError as exc:
        print(f"readme_figures: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
