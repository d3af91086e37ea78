"""The serde boundary holds: protobuf types stay in proto/ and the three thin servicers.

Everything else (the coordinator, the SwarmX reduction, the stores, the nodes'
workers) works on the domain types of ``proto.domain`` and the typed clients
of ``proto.clients``. Scans the imports of every module of the project's
packages (those import-linter layers) with ``ast``.
"""

from __future__ import annotations

import ast
import re
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
#: Outside proto/, only these modules may touch protobuf messages: decode, call, encode.
#: ``swarmx/reducing.py`` is the reduce half of the SwarmX servicer (a mixin of it).
SERVICERS = {"memoryx/service.py", "swarmx/service.py", "swarmx/reducing.py", "nodes/service.py"}
_PROTOBUF_MODULE = re.compile(r"(^|\.)\w+_pb2(_grpc)?$|^google\.protobuf(\.|$)")


def _packages() -> list[str]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return config["tool"]["importlinter"]["root_packages"]


def protobuf_uses(source: str) -> list[str]:
    """What in ``source`` reaches protobuf: imports of ``*_pb2`` / ``*_pb2_grpc`` /
    ``google.protobuf`` modules, and ``WhichOneof`` calls."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [f"import {a.name}" for a in node.names if _PROTOBUF_MODULE.search(a.name)]
        elif isinstance(node, ast.ImportFrom):
            module = "." * node.level + (node.module or "")
            if _PROTOBUF_MODULE.search(module):
                found.append(f"from {module} import ...")
            found += [
                f"from {module} import {a.name}"
                for a in node.names
                if _PROTOBUF_MODULE.search(f"{node.module or ''}.{a.name}")
            ]
        elif isinstance(node, ast.Attribute) and node.attr == "WhichOneof":
            found.append(f"WhichOneof (line {node.lineno})")
    return found


def _outside_boundary() -> list[Path]:
    files = []
    for package in _packages():
        if package == "proto":
            continue
        for path in sorted((ROOT / package).rglob("*.py")):
            if path.relative_to(ROOT).as_posix() not in SERVICERS:
                files.append(path)
    return files


def test_scan_covers_the_modules_that_used_protobuf_before():
    scanned = {p.relative_to(ROOT).as_posix() for p in _outside_boundary()}
    assert {"emulator/coordinator.py", "swarmx/reduce.py", "emulator/train.py"} <= scanned
    assert not scanned & SERVICERS


def test_no_module_outside_proto_and_the_servicers_touches_protobuf():
    leaks = {
        path.relative_to(ROOT).as_posix(): uses
        for path in _outside_boundary()
        if (uses := protobuf_uses(path.read_text()))
    }
    assert leaks == {}, (
        "protobuf types leak past the serde boundary; use proto.domain, proto.serde and "
        f"proto.clients instead: {leaks}"
    )


def test_whichoneof_only_in_serde():
    """Even the servicers ask the serde boundary what a message carries (``from_wire``)."""
    users = {
        path.relative_to(ROOT).as_posix()
        for package in _packages()
        for path in (ROOT / package).rglob("*.py")
        if not path.name.endswith(("_pb2.py", "_pb2_grpc.py"))
        and any(u.startswith("WhichOneof") for u in protobuf_uses(path.read_text()))
    }
    assert users == {"proto/frames.py", "proto/serde.py"}


@pytest.mark.parametrize(
    "source",
    [
        "from proto import tensor_pb2 as pb",
        "from proto import memoryx_pb2_grpc",
        "import proto.node_pb2",
        "from proto.swarmx_pb2 import LayerRequest",
        "from .tensor_pb2 import LayerMessage",
        "from google.protobuf import message",
        "kind = message.WhichOneof('kind')",
    ],
)
def test_scan_finds_each_way_of_reaching_protobuf(source):
    assert protobuf_uses(source)


@pytest.mark.parametrize(
    "source",
    [
        "from proto.serde import encode_layer",
        "from proto.domain import Chunk",
        "from proto import clients",
        "import proto.clients",
        "pb2 = 1",
    ],
)
def test_scan_passes_domain_imports(source):
    assert protobuf_uses(source) == []
