"""The committed gRPC/protobuf stubs match proto/*.proto, and a stale stub is caught."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from proto import generate


def test_committed_stubs_are_up_to_date():
    assert generate.stale_files() == []


@pytest.fixture
def proto_copy(tmp_path, monkeypatch) -> Path:
    """A copy of proto/ (sources and committed stubs) that ``generate`` works on."""
    copy = tmp_path / "proto"
    copy.mkdir()
    for path in generate.PROTO_DIR.iterdir():
        if path.suffix == ".proto" or path.name.endswith(generate.GENERATED_SUFFIXES):
            shutil.copy2(path, copy / path.name)
    monkeypatch.setattr(generate, "PROTO_DIR", copy)
    monkeypatch.setattr(generate, "REPO_ROOT", tmp_path)
    return copy


def test_copy_of_the_committed_tree_is_not_stale(proto_copy):
    assert generate.stale_files() == []


def test_added_field_makes_its_stubs_stale(proto_copy):
    source = proto_copy / "memoryx.proto"
    text = source.read_text()
    anchor = "message StepRequest {\n  int64 step = 1;\n"
    assert anchor in text
    source.write_text(text.replace(anchor, anchor + "  int64 extra_field = 2;\n"))
    stale = generate.stale_files()
    assert "memoryx_pb2.py" in stale and "memoryx_pb2.pyi" in stale
    assert not any(name.startswith(("tensor_", "node_", "swarmx_")) for name in stale)


def test_new_rpc_makes_grpc_stub_stale(proto_copy):
    source = proto_copy / "node.proto"
    text = source.read_text()
    anchor = "  rpc ResetStats(Empty) returns (Empty);\n"
    assert anchor in text
    source.write_text(text.replace(anchor, anchor + "  rpc Ping(Empty) returns (Empty);\n"))
    assert "node_pb2_grpc.py" in generate.stale_files()


def test_missing_and_extra_stubs_are_reported(proto_copy):
    (proto_copy / "swarmx_pb2.pyi").unlink()
    (proto_copy / "old_pb2.py").write_text("# left over from a removed .proto\n")
    assert generate.stale_files() == ["old_pb2.py", "swarmx_pb2.pyi"]


def test_check_command_exit_status(proto_copy, capsys):
    assert generate.main(["--check"]) == 0
    (proto_copy / "tensor_pb2.py").write_text("# edited by hand\n")
    assert generate.main(["--check"]) == 1
    assert "tensor_pb2.py" in capsys.readouterr().out
