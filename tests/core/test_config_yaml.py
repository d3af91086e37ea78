"""``core.config.load_yaml``: every way a config file can be unreadable is one paragraph naming it."""

from __future__ import annotations

import math

import pytest

from core.config import from_dict, load_yaml
from memoryx.optim import Optimizer


def _error(path) -> str:
    with pytest.raises(ValueError) as info:
        load_yaml(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    return message


def test_valid_file_loads(tmp_path):
    path = tmp_path / "ok.yaml"
    path.write_text("num_nodes: 2\noptimizer: {name: sgd, lr: 0.1}\nlist: [{a: 1}, {a: 2}]\n")
    assert load_yaml(path) == {
        "num_nodes": 2,
        "optimizer": {"name": "sgd", "lr": 0.1},
        "list": [{"a": 1}, {"a": 2}],
    }
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing\n")
    assert load_yaml(empty) is None


def test_directory_is_not_a_config_file(tmp_path):
    assert "is a directory" in _error(tmp_path)


def test_missing_file(tmp_path):
    assert "does not exist" in _error(tmp_path / "absent.yaml")


def test_non_utf8_file_names_the_file_and_byte(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("num_nodes: 2  # café\n".encode("latin-1"))
    assert "is not UTF-8 text (byte 0xe9 at line 1, column 20)" in _error(path)


def test_malformed_yaml_gives_line_and_column(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("num_nodes: 2\noptimizer:\n  lr: [0.1\n  name: sgd\n")
    message = _error(path)
    assert "is not valid YAML at line 4, column 7" in message, message


@pytest.mark.parametrize(
    ("text", "dotted", "lines"),
    [
        ("num_nodes: 2\nseed: 1\nnum_nodes: 4\n", "num_nodes", "lines 1 and 3"),
        ("optimizer:\n  lr: 0.1\n  name: sgd\n  lr: 0.2\n", "optimizer.lr", "lines 2 and 4"),
        ("groups:\n  - {a: 1, b: 2, a: 3}\n", "groups[0].a", "lines 2 and 2"),
    ],
)
def test_duplicate_keys_are_refused_with_their_dotted_name(tmp_path, text, dotted, lines):
    path = tmp_path / "dup.yaml"
    path.write_text(text)
    message = _error(path)
    assert f"sets {dotted} twice ({lines})" in message, message


def test_nan_is_refused_for_any_float_field():
    with pytest.raises(ValueError, match=r"optimizer.lr = nan is not valid"):
        from_dict(Optimizer.Config, {"lr": math.nan}, "optimizer")


def test_numbers_in_exponent_notation_are_floats_as_in_yaml_1_2(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(
        "optimizer: {lr: 1.0e6}\na: 1e-3\nb: -2.5E+3\nc: .5\nd: 7\ne: .inf\nf: v1.0e6\ng: 1.2.3\n"
    )
    data = load_yaml(path)
    # PyYAML (YAML 1.1) reads 1.0e6 and 1e-3 as strings; a user means numbers.
    assert data["optimizer"]["lr"] == 1.0e6 and isinstance(data["optimizer"]["lr"], float)
    assert data["a"] == 1e-3 and data["b"] == -2500.0 and data["c"] == 0.5
    assert data["d"] == 7 and isinstance(data["d"], int)
    assert data["e"] == float("inf")
    assert data["f"] == "v1.0e6" and data["g"] == "1.2.3"
