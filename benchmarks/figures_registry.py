"""The README's figures: each name, the seeded commands that produce it, and how it is rendered.

``benchmarks/readme_figures.py`` runs the commands and compares (or replaces) the
text between ``<!-- figure: NAME -->`` and ``<!-- /figure: NAME -->`` in README.md.
A renderer gets one ``Output`` per command (its stdout and, for ``json=True``, the
JSON it wrote) and returns the exact text of the block.

``fast`` figures (the analytic model, the zoo's sizes: seconds each) run in CI;
the slow ones train on the cluster (minutes each on 2 cores) and are checked
by running the script without ``--fast``.
"""

from __future__ import annotations

import re
import sys
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from core.units import format_seconds
from emulator.cli import summary as train_summary
from emulator.cli_scale import runtime_rows
from emulator.table import human_bytes

#: Subcommands whose progress bar goes to stderr; the script passes --quiet.
_QUIET = {"train", "eval", "compare"}


@dataclass(frozen=True)
class Command:
    """One command as the README shows it: ``wafer ...`` or ``python ...`` from the repo root."""

    argv: tuple[str, ...]
    #: Append ``--json PATH`` (not shown in the README) and give the renderer the file.
    json: bool = True
    ok_returncodes: tuple[int, ...] = (0,)

    @property
    def shown(self) -> str:
        return " ".join(self.argv)

    def executable_argv(self, json_path: str) -> list[str]:
        program, *rest = self.argv
        if program == "wafer":
            head = [sys.executable, "-m", "emulator.cli"]
        elif program == "python":
            head = [sys.executable]
        else:
            raise ValueError(f"command {self.shown!r} must start with wafer or python")
        if program == "wafer" and rest and rest[0] in _QUIET:
            rest = [*rest, "--quiet"]
        return head + rest + (["--json", json_path] if self.json else [])


@dataclass(frozen=True)
class Output:
    stdout: str
    json: Any


@dataclass(frozen=True)
class Figure:
    name: str
    commands: tuple[Command, ...]
    render: Callable[[list[Output]], str]
    fast: bool = False


def wafer(*args: str, json: bool = True) -> Command:
    return Command(("wafer", *args), json=json)


def python(*args: str, json: bool = True) -> Command:
    return Command(("python", *args), json=json)


# ---- formatting -------------------------------------------------------------------------


def pct(fraction: float) -> str:
    return f"{100 * fraction:.2f}%"


def si(value: float, unit: str, digits: int = 3) -> str:
    """``0.00676, "J"`` -> ``6.76 mJ``: three significant digits and an SI prefix."""
    for prefix, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3), ("", 1.0), ("m", 1e-3)):
        if abs(value) >= scale:
            return f"{value / scale:.{digits}g} {prefix}{unit}"
    for prefix, scale in (("u", 1e-6), ("n", 1e-9)):
        if abs(value) >= scale:
            return f"{value / scale:.{digits}g} {prefix}{unit}"
    return f"{value:.{digits}g} {unit}"


def tops_w(value: float) -> str:
    return f"{value:.3g}" if value >= 0.01 else f"{value:.2e}"


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def prose(text: str) -> str:
    """A generated sentence, wrapped like the README's own paragraphs."""
    # A number stays on the line of its unit ("254.5 us").
    glued = re.sub(r"(\d) (?=[a-zA-Z%]{1,5}\b)", "\\1\u00a0", text)
    wrapped = textwrap.fill(glued, width=78, break_long_words=False, break_on_hyphens=False)
    return wrapped.replace("\u00a0", " ")


def fenced(text: str) -> str:
    return f"```\n{text.rstrip()}\n```"


def without_wrote(stdout: str) -> str:
    """The command's stdout without its ``wrote PATH`` lines (a temp path)."""
    return "\n".join(line for line in stdout.rstrip().split("\n") if not line.startswith("wrote "))


def backend_label(spec: str) -> str:
    """``photonic:ffm`` -> ``photonic (ffm)``; plain photonic trains by backprop."""
    kind, _, training = spec.partition(":")
    if kind == "photonic" and not training:
        training = "backprop"
    return f"{kind} ({training})" if training else kind


# ---- renderers ----------------------------------------------------------------------------


def render_train_summary(outputs: list[Output]) -> str:
    """The summary ``wafer train`` prints, with the wall time and the rows of the run's own
    cost (launch, processes, memory: measurements of this machine) elided."""
    result = dict(outputs[0].json, wall_time_s=0.0, step_wall_time_s=0.0, runtime=None)
    measured = [label for label, _ in runtime_rows(outputs[0].json.get("runtime"))]
    lines = []
    for line in train_summary(result).split("\n"):
        if not line.startswith("wall time"):
            lines.append(line)
            continue
        line = line.replace("0.0 s (0.0 ms/step)", "...")
        value_at = line.index("...")
        lines += [line, *(f"{label:<{value_at}}..." for label in measured)]
    return fenced("\n".join(lines))


def render_zoo(outputs: list[Output]) -> str:
    rows = [
        [
            f"`{m['name']}`",
            f"{m['num_params']:,}",
            str(m["num_layers"]),
            f"`{m['data']}`",
            m["description"],
        ]
        for m in outputs[0].json["models"]
    ]
    return markdown_table(["name", "parameters", "streamed layers", "data", "model"], rows)


def render_sparsity_train(outputs: list[Output]) -> str:
    dense, sparse = outputs[0].json, outputs[1].json
    sp = sparse["sparsity"]
    dt, st = dense["traffic"], sparse["traffic"]

    def share(key: str) -> str:
        return f"{human_bytes(st[key])} ({100 * st[key] / dt[key]:.1f}%)"

    emulated = sparse["emulated"]
    return markdown_table(
        ["", "dense", "sparsity 0.9"],
        [
            ["eval accuracy", pct(dense["eval"]["accuracy"]), pct(sparse["eval"]["accuracy"])],
            ["weight density", "100%", f"{100 * sp['density']:.1f}% (biases stay dense)"],
            [
                "MemoryX egress / step",
                human_bytes(dt["memoryx_egress_bytes"]),
                share("memoryx_egress_bytes"),
            ],
            [
                "MemoryX ingress / step",
                human_bytes(dt["memoryx_ingress_bytes"]),
                share("memoryx_ingress_bytes"),
            ],
            [
                f"emulated step ({emulated['hardware']})",
                format_seconds(dense["emulated"]["step_time_s"]),
                f"{format_seconds(emulated['step_time_s'])} ({sp['emulated_speedup']:.2f}x, "
                f"{emulated['bound']}-bound)",
            ],
        ],
    )


def render_stdout_table(outputs: list[Output]) -> str:
    """A command's table as it prints it, without the title line and the ``wrote`` lines."""
    return fenced("\n".join(without_wrote(outputs[0].stdout).split("\n")[1:]))


def render_stdout(outputs: list[Output]) -> str:
    return fenced(without_wrote(outputs[0].stdout))


def render_pcm_drift(outputs: list[Output]) -> str:
    from emulator.compare import _duration

    d = outputs[0].json
    rows = [["digital, same weights", pct(d["digital_accuracy"]), ""]]
    for t, comp, raw in zip(
        d["drift_times_s"], d["accuracy_compensated"], d["accuracy_uncompensated"], strict=True
    ):
        # "3600 s (1 h)" -> "1 h": the readable part, where there is one.
        label = _duration(t)
        rows.append(
            [label[label.find("(") + 1 : -1] if "(" in label else label, pct(comp), pct(raw)]
        )
    return markdown_table(
        ["time after programming", "global drift compensation", "no compensation"], rows
    )


def render_compare(outputs: list[Output]) -> str:
    rows = [
        [
            backend_label(row["backend"]),
            "-" if row["accuracy"] is None else pct(row["accuracy"]),
            format_seconds(row["run_time_s"]),
            si(row["run_energy_j"], "J"),
            si(row["energy_per_sample_j"], "J"),
            tops_w(row["tops_per_watt"]),
            tops_w(row["node_tops_per_watt"]),
        ]
        for row in outputs[0].json["rows"]
    ]
    steps = outputs[0].json["rows"][0]["num_steps"]
    headers = ["backend", "accuracy", f"emulated time ({steps} steps)", "energy"]
    return markdown_table([*headers, "energy/sample", "TOPS/W", "node TOPS/W"], rows)


def _row(outputs: list[Output], spec: str, index: int = 0) -> dict:
    return next(r for r in outputs[index].json["rows"] if r["backend"] == spec)


def render_pcm_step(outputs: list[Output]) -> str:
    pcm, cs2 = _row(outputs, "pcm"), _row(outputs, "cs2")
    d = pcm["details"]
    return prose(
        f"A PCM step takes {format_seconds(pcm['step_time_s'])}, of which "
        f"{format_seconds(d['program_time_s_per_step'])} is programming (program-and-verify "
        f"of every streamed matrix) and {format_seconds(d['mvm_time_s_per_step'])} the analog "
        "reads: streaming weights through PCM every step is write-bound, and every step writes "
        f"each device {d['write_cycles_per_device_per_step']:g} times (projected endurance: "
        f"{d['endurance_steps']:,.0f} steps, {d['endurance_lifetime_s'] / 3600:.3g} hours at this "
        "step time; JSON `details.endurance_*`). The node's own energy "
        f"is {si(pcm['node_energy_j'], 'J')} per step, the cluster's "
        f"{si(pcm['step_energy_j'], 'J')}, nearly all MemoryX and SwarmX power over the long "
        "step: the cs2 row is a whole CS-2 system streaming a tiny model, and the PCM row pays "
        f"for the same stores for {pcm['step_time_s'] / cs2['step_time_s']:.0f}x as long."
    )


def render_pcm_simulate(outputs: list[Output]) -> str:
    pcm, cs2 = outputs[0].json["results"][0], outputs[1].json["results"][0]
    parts = pcm["node_time_by_part_s"]
    return (
        fenced(without_wrote(outputs[0].stdout))
        + "\n\n"
        + prose(
            f"One node takes {format_seconds(pcm['step_time_s'])} per step (CS-2: "
            f"{format_seconds(cs2['step_time_s'])}), of which {format_seconds(parts['mvm'])} analog "
            f"MVMs, {format_seconds(parts['digital'])} the digital unit (the backward pass and the "
            f"rest) and {format_seconds(parts['program'])} programming."
        )
    )


def render_pcm_calibration(outputs: list[Output]) -> str:
    lines = without_wrote(outputs[0].stdout).split("\n")
    headers = lines[0].split()
    rows = []
    for line in lines[1:]:
        *label, tops, tops_w, fj, ns = line.split()
        rows.append([" ".join(label), tops, tops_w, fj, ns])
    return markdown_table(headers, rows)


def render_in_situ(outputs: list[Output]) -> str:
    runs = [o.json for o in outputs]
    headers = ["network"] + [f"{r['steps']} steps, lr {r['lr']:g}" for r in runs]
    labels = [
        ("trained by backprop on the twin, evaluated on the twin", "twin_accuracy"),
        ("the same phases deployed on the physical node", "deployed_accuracy"),
        ("trained by `ffm` on the physical node", "ffm_accuracy"),
    ]
    return markdown_table(headers, [[label] + [pct(r[key]) for r in runs] for label, key in labels])


def render_dfa(outputs: list[Output]) -> str:
    dfa, cs2 = _row(outputs, "photonic:dfa"), _row(outputs, "cs2")
    gap = 100 * (cs2["accuracy"] - dfa["accuracy"])
    return prose(
        f"`--backend photonic --training dfa` reaches {pct(dfa['accuracy'])}, and `--backend cs2` "
        f"(backprop) reaches {pct(cs2['accuracy'])}: a gap of {gap:.2f} points."
    )


def render_taichi(outputs: list[Output]) -> str:
    labels = {
        "cs2": "`--backend cs2` (digital twin)",
        "photonic": "`--backend photonic`: trained on the twin, evaluated on the physical node",
        "photonic:ffm": "`--backend photonic --training ffm`: trained in situ",
    }
    rows = [[labels[r["backend"]], pct(r["accuracy"])] for r in outputs[0].json["rows"]]
    fixed = _row(outputs, "cs2", index=1)
    rows.insert(1, ["`--model taichi-digits-fixed`, `--backend cs2`", pct(fixed["accuracy"])])
    return markdown_table(["run", "accuracy"], rows)


def render_taichi_ffm_step(outputs: list[Output]) -> str:
    result = outputs[0].json["results"][0]
    parts = result["node_time_by_part_s"]
    light = parts["optics"] + parts.get("ffm_error", 0.0)
    return prose(
        f"A step is {format_seconds(result['step_time_s'])}: "
        f"{format_seconds(parts['program'])} of thermal tuning against {format_seconds(light)} "
        "of light (the forward optics and the ffm error pass). Streamed diffractive weights pay "
        "for reconfiguration, not for light."
    )


def render_photonic_step(outputs: list[Output]) -> str:
    backprop = _row(outputs, "photonic")
    dfa = _row(outputs, "photonic:dfa", index=1)
    d = dfa["details"]
    return prose(
        "Putting the twin-trained model on the chip is the one-off `deployment` in the JSON: "
        f"{format_seconds(backprop['details']['deployment_time_s'])} of thermal tuning and "
        f"{si(backprop['details']['deployment_energy_j'], 'J')} of heater energy for the three "
        "layers. Reprogramming dominates a streamed step: with DFA, "
        f"{format_seconds(d['program_time_s_per_step'])} of the "
        f"{format_seconds(dfa['step_time_s'])} step and "
        f"{si(d['program_energy_j_per_step'], 'J')} of the node's "
        f"{si(dfa['node_energy_j'], 'J')} are programming, hence the low node TOPS/W."
    )


def render_groups_simulate(outputs: list[Output]) -> str:
    """Both balances of one mixed cluster: each table as printed, without its title."""
    tables = ["\n".join(without_wrote(o.stdout).split("\n")[1:]) for o in outputs]
    return fenced("\n\n".join(tables))


# ---- the registry --------------------------------------------------------------------------

QUICKSTART = wafer("train", "--model", "mlp-digits", "--nodes", "4", "--seed", "0")
COMPARE = wafer(
    "compare", "--backends", "cs2,pcm,photonic", "--model", "mlp-digits", "--steps", "100",
    "--nodes", "2", "--batch-size", "128", "--seed", "0",
)  # fmt: skip
COMPARE_PHOTONIC = wafer(
    "compare", "--backends", "photonic:ffm,photonic:dfa", "--model", "mlp-digits", "--steps",
    "100", "--nodes", "2", "--batch-size", "128", "--seed", "0",
)  # fmt: skip


def _figures(*figures: Figure) -> dict[str, Figure]:
    return {f.name: f for f in figures}


FIGURES: dict[str, Figure] = _figures(
    Figure("quickstart-summary", (QUICKSTART,), render_train_summary),
    Figure("zoo", (python("-m", "emulator.zoo"),), render_zoo, fast=True),
    Figure(
        "sparsity-train",
        (
            QUICKSTART,
            wafer(
                "train", "--model", "mlp-digits", "--nodes", "4", "--sparsity", "0.9", "--seed", "0"
            ),
        ),
        render_sparsity_train,
    ),  # fmt: skip
    Figure(
        "sparsity-simulate",
        (wafer("simulate", "--model", "gpt3-1.3b", "--sparsity", "0,0.5,0.75,0.9"),),
        render_stdout_table,
        fast=True,
    ),
    Figure(
        "pcm-drift",
        (
            wafer(
                "eval",
                "--backend",
                "pcm",
                "--model",
                "mlp-digits",
                "--drift-times",
                "1,3600,86400,31536000",
                "--steps",
                "200",
                "--nodes",
                "2",
                "--seed",
                "0",
            ),
        ),
        render_pcm_drift,
    ),  # fmt: skip
    Figure("compare-backends", (COMPARE,), render_compare),
    Figure("pcm-step", (COMPARE,), render_pcm_step),
    Figure(
        "pcm-simulate",
        (
            wafer("simulate", "--model", "gpt3-1.3b", "--nodes", "1,4,16", "--backend", "pcm"),
            wafer("simulate", "--model", "gpt3-1.3b", "--nodes", "1", "--backend", "cs2"),
        ),
        render_pcm_simulate,
        fast=True,
    ),
    Figure(
        "groups-simulate",
        (
            wafer("simulate", "--model", "gpt3-1.3b", "--node-groups", "cs2:2,cs2@cs3:2"),
            wafer(
                "simulate",
                "--model",
                "gpt3-1.3b",
                "--node-groups",
                "cs2:2,cs2@cs3:2",
                "--balance",
                "throughput",
            ),
        ),
        render_groups_simulate,
        fast=True,
    ),  # fmt: skip
    Figure(
        "pcm-calibration",
        (python("-m", "nodes.pcm", json=False),),
        render_pcm_calibration,
        fast=True,
    ),  # fmt: skip
    Figure(
        "photonic-in-situ",
        (
            python(
                "examples/photonic_in_situ.py",
                *("--steps", "80", "--lr", "0.02", "--device", "uncalibrated", "--seed", "0"),
            ),
            python(
                "examples/photonic_in_situ.py",
                *("--steps", "150", "--lr", "0.01", "--device", "uncalibrated", "--seed", "0"),
            ),
        ),
        render_in_situ,
    ),
    Figure(
        "photonic-dfa",
        (
            wafer(
                "compare",
                "--backends",
                "cs2,photonic:dfa",
                "--model",
                "mlp-digits",
                "--steps",
                "300",
                "--nodes",
                "2",
                "--batch-size",
                "128",
                "--seed",
                "0",
            ),
        ),
        render_dfa,
    ),  # fmt: skip
    Figure(
        "taichi",
        (
            wafer(
                "compare",
                "--backends",
                "cs2,photonic,photonic:ffm",
                "--model",
                "taichi-digits",
                "--steps",
                "300",
                "--nodes",
                "2",
                "--batch-size",
                "128",
                "--seed",
                "0",
            ),
            wafer(
                "compare",
                "--backends",
                "cs2",
                "--model",
                "taichi-digits-fixed",
                "--steps",
                "300",
                "--nodes",
                "2",
                "--batch-size",
                "128",
                "--seed",
                "0",
            ),
        ),
        render_taichi,
    ),  # fmt: skip
    Figure(
        "taichi-ffm-step",
        (
            wafer(
                "simulate",
                "--model",
                "taichi-digits",
                "--nodes",
                "1",
                "--backend",
                "photonic",
                "--training",
                "ffm",
            ),
        ),
        render_taichi_ffm_step,
        fast=True,
    ),  # fmt: skip
    Figure("compare-photonic", (COMPARE_PHOTONIC,), render_compare),
    Figure("photonic-step", (COMPARE, COMPARE_PHOTONIC), render_photonic_step),
)
