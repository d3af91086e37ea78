"""The repository's docs are self-contained: citations point inside the repository.

Hardware figures are cited as ``docs/hardware.md §N.M``; nothing may point at the
design notes outside the repository that users of the package do not have.
"""

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Spelled in pieces so that this file does not match itself.
FORBIDDEN = ("shared" + "/design", "REFERENCE" + ".md")
CITATION = re.compile(r"hardware\.md(?:#s| §)(\d+(?:\.\d+)?)")


def _repository_files() -> list[Path]:
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split("\n")
    return [ROOT / name for name in listed if name and (ROOT / name).is_file()]


def _texts():
    for path in _repository_files():
        try:
            yield path, path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue  # binary data (npz, gz)


def test_no_reference_outside_the_repository():
    offenders = [
        f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
        for path, text in _texts()
        for number, line in enumerate(text.splitlines(), 1)
        if any(word in line for word in FORBIDDEN)
    ]
    assert not offenders, "cite docs/hardware.md instead:\n" + "\n".join(offenders)


def test_every_hardware_citation_names_a_section_that_exists():
    anchors = set(re.findall(r'<a id="s([\d.]+)"></a>', (ROOT / "docs/hardware.md").read_text()))
    assert {"1", "1.1", "3.2", "4.4", "5"} <= anchors
    cited = {
        (str(path.relative_to(ROOT)), section)
        for path, text in _texts()
        for section in CITATION.findall(text)
    }
    assert len(cited) > 30  # presets, code and README cite it
    missing = sorted(f"{where}: §{section}" for where, section in cited if section not in anchors)
    assert not missing, "no such section in docs/hardware.md:\n" + "\n".join(missing)
