"""A user's own data (``DataConfig(path=...)``): the three forms, the seeded split, and the errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from core.data import DataConfig

FACTORY = "tests.emulator.user_models:blob_data"


def _classification_npz(path, num_samples=50, **extra):
    rng = np.random.default_rng(7)
    x = rng.normal(size=(num_samples, 6)).astype(np.float64)
    y = np.arange(num_samples) % 3
    np.savez(path, x=x, y=y, **extra)
    return x, y


def test_npz_without_a_test_set_is_split_by_data_seed(tmp_path):
    path = tmp_path / "d.npz"
    x, y = _classification_npz(path)
    data = DataConfig(path=str(path), test_fraction=0.2).build(seed=0)
    again = DataConfig(path=str(path), test_fraction=0.2).build(seed=5)  # run seed: no effect
    other = DataConfig(path=str(path), test_fraction=0.2, data_seed=1).build(seed=0)
    assert data.task == "classification" and data.num_classes == 3
    assert data.train_inputs.dtype == torch.float32 and data.train_targets.dtype == torch.int64
    assert (len(data.train_inputs), len(data.test_inputs)) == (40, 10)
    assert torch.equal(data.test_inputs, again.test_inputs)
    assert not torch.equal(data.test_inputs, other.test_inputs)
    # Train and test together are exactly the file's samples, each once.
    rows = torch.cat([data.train_inputs, data.test_inputs])
    expected = torch.from_numpy(x.astype(np.float32))
    assert torch.equal(rows[rows[:, 0].argsort()], expected[expected[:, 0].argsort()])


def test_npz_test_arrays_are_the_test_set(tmp_path):
    path = tmp_path / "d.npz"
    x_test, y_test = np.ones((4, 6), np.float32), np.array([0, 1, 2, 3])
    x, y = _classification_npz(path, x_test=x_test, y_test=y_test)
    data = DataConfig(path=str(path)).build(seed=0)
    assert torch.equal(data.train_targets, torch.from_numpy(y))
    assert torch.equal(data.test_targets, torch.from_numpy(y_test))
    assert data.num_classes == 4


def test_npz_of_token_sequences_is_a_language_model_set(tmp_path):
    path = tmp_path / "lm.npz"
    tokens = np.arange(10 * 9).reshape(10, 9) % 17
    np.savez(path, x=tokens[:, :-1].astype(np.int32), y=tokens[:, 1:].astype(np.int32))
    data = DataConfig(path=str(path), test_fraction=0.2).build(seed=0)
    assert data.task == "language-model"
    assert data.train_inputs.dtype == torch.int64 and data.train_inputs.shape == (8, 8)
    assert data.num_classes == 17


def test_token_file_is_cut_into_seq_len_windows(tmp_path):
    path = tmp_path / "train.bin"
    tokens = (np.arange(1000) * 7 % 300).astype(np.uint16)
    tokens.tofile(path)
    data = DataConfig(path=str(path), seq_len=16, test_fraction=0.1).build(seed=0)
    assert data.task == "language-model" and data.num_classes == 300
    assert data.train_inputs.shape == ((900 - 1) // 16, 16)
    assert torch.equal(data.train_inputs[1], torch.from_numpy(tokens[16:32].astype(np.int64)))
    assert torch.equal(data.train_targets[1], torch.from_numpy(tokens[17:33].astype(np.int64)))
    assert torch.equal(data.test_inputs[0], torch.from_numpy(tokens[900:916].astype(np.int64)))


def test_factory_datasets_are_stacked():
    data = DataConfig(path=FACTORY).build(seed=0)
    assert data.task == "classification" and data.num_classes == 4
    assert data.train_inputs.shape == (96, 64) and data.test_inputs.shape == (20, 64)
    assert data.description == f"data factory {FACTORY!r}"


def _error(tmp_path, arrays: dict | None = None, **config) -> str:
    if arrays is not None:
        np.savez(tmp_path / "bad.npz", **arrays)
        config.setdefault("path", str(tmp_path / "bad.npz"))
    with pytest.raises(ValueError) as info:
        DataConfig(**config).build(seed=0)
    message = str(info.value)
    assert "\n" not in message  # one paragraph
    return message


def test_missing_file_names_the_file(tmp_path):
    message = _error(tmp_path, path=str(tmp_path / "nope.npz"))
    assert "nope.npz" in message and "no such file" in message


def test_unknown_suffix_says_how_to_save(tmp_path):
    (tmp_path / "d.csv").write_text("1,2\n")
    message = _error(tmp_path, path=str(tmp_path / "d.csv"))
    assert "d.csv" in message and "np.savez" in message and "module:factory" in message


def test_path_and_name_together_are_rejected(tmp_path):
    _classification_npz(tmp_path / "d.npz")
    message = _error(tmp_path, path=str(tmp_path / "d.npz"), name="text")
    assert "only one" in message


@pytest.mark.parametrize(
    ("arrays", "needles"),
    [
        ({"x": np.zeros((5, 2)), "y": np.zeros(4, np.int64)}, ["5 samples", "4", "same first"]),
        ({"x": np.zeros((5, 2)), "y": np.zeros(5)}, ["y has dtype float64", "astype(np.int64)"]),
        ({"x": np.array([["a"]] * 5), "y": np.zeros(5, np.int64)}, ["x has dtype <U1", "float32"]),
        ({"x": np.zeros((5, 2)), "y": -np.ones(5, np.int64)}, ["below 0", "-1"]),
        ({"x": np.zeros((5, 2))}, ["no 'y'", "np.savez"]),
        ({"x": np.zeros((5, 2)), "y": np.zeros(5, int), "x_test": np.zeros((1, 2))}, ["y_test"]),
        ({"x": np.zeros((5, 2)), "y": np.zeros((5, 3), int)}, ["shape [N]", "seq_len"]),
    ],
)
def test_bad_npz_is_one_paragraph_naming_the_file(tmp_path, arrays, needles):
    message = _error(tmp_path, arrays)
    assert "bad.npz" in message
    for needle in needles:
        assert needle in message, message


def test_odd_sized_token_file_is_not_uint16(tmp_path):
    (tmp_path / "t.bin").write_bytes(b"\x01\x00\x02")
    message = _error(tmp_path, path=str(tmp_path / "t.bin"))
    assert "t.bin" in message and "uint16" in message


def test_token_file_shorter_than_two_windows(tmp_path):
    np.arange(100, dtype=np.uint16).tofile(tmp_path / "t.bin")
    message = _error(tmp_path, path=str(tmp_path / "t.bin"), seq_len=32, test_fraction=0.2)
    assert "t.bin" in message and "seq_len = 32" in message and "at most 19" in message


def test_factory_must_return_a_pair():
    with pytest.raises(ValueError, match=r"not_a_pair.*\(train, test\)"):
        DataConfig(path="tests.emulator.user_models:not_a_pair").build(seed=0)


def test_labels_beyond_the_models_outputs(tmp_path):
    _classification_npz(tmp_path / "d.npz")
    data = DataConfig(path=str(tmp_path / "d.npz")).build(seed=0)
    data.check_outputs((2, 3))  # three classes, three outputs: fine
    with pytest.raises(ValueError, match=r"d\.npz.*labels up to 2 \(3 classes\).*2 outputs"):
        data.check_outputs((2, 2))
    with pytest.raises(ValueError, match=r"\[batch, classes\]"):
        data.check_outputs((2, 3, 4))


def test_sequences_longer_than_the_models_positions(tmp_path):
    np.arange(400, dtype=np.uint16).tofile(tmp_path / "t.bin")
    data = DataConfig(path=str(tmp_path / "t.bin"), seq_len=32).build(seed=0)
    data.check_positions(32)
    data.check_positions(None)
    with pytest.raises(ValueError, match=r"t\.bin.*32 tokens.*16 positions.*--seq-len 16"):
        data.check_positions(16)
    # Windows end at token 384: the rest of the file fills no whole window.
    with pytest.raises(ValueError, match=r"token ids up to 384.*300 tokens"):
        data.check_outputs((2, 32, 300))
