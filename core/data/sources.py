"""Raw tensors of the three data sets, before they are wrapped in a ``Dataset``.

Everything here is a pure function of its arguments: every compute node calls
it on its own and must get bit-identical tensors, so the randomness comes from
numpy's PCG64 generator seeded through ``SeedSequence`` (portable across
platforms and processes) and never from global state.
"""

from __future__ import annotations

import functools
import gzip
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

DATA_DIR = Path(__file__).resolve().parent
DIGITS_FILE = DATA_DIR / "digits.npz"
TEXT_FILE = DATA_DIR / "pride_and_prejudice.txt.gz"

# The digits are 4-bit counts: each pixel counts set bits in a 4x4 block of
# the original 32x32 bitmap, so 16 is the largest value (see README.md).
DIGITS_MAX_PIXEL = 16
# The shipped text is pure ASCII, so a token is the byte value itself.
TEXT_VOCAB_SIZE = 128

# Stream tags that keep the generator streams for the Markov chain, the test
# sequences and the training sequences apart even when two seeds coincide.
_CHAIN_STREAM, _TEST_STREAM, _TRAIN_STREAM = 0, 1, 2

Split = tuple[Tensor, Tensor, Tensor, Tensor]


@functools.cache
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    with np.load(DIGITS_FILE) as archive:
        return archive["images"], archive["labels"]


@functools.cache
def _text_bytes() -> np.ndarray:
    with gzip.open(TEXT_FILE, "rb") as f:
        return np.frombuffer(f.read(), dtype=np.uint8)


def digits_split(*, test_fraction: float, split_seed: int) -> Split:
    """Stratified split of the 1797 digits: ``(x_train, y_train, x_test, y_test)``.

    Inputs are float32 in [0, 1], shape ``[N, 64]`` (row-major 8x8 image);
    targets int64 in 0..9. Each class sends ``round(test_fraction * count)``
    of its samples to the test set, so the class balance is the same in both.
    """
    images, labels = _digits_arrays()
    rng = np.random.default_rng([split_seed])
    test_mask = np.zeros(len(labels), dtype=bool)
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        test_mask[members[: round(test_fraction * len(members))]] = True
    x = torch.from_numpy(images.reshape(len(images), -1).astype(np.float32) / DIGITS_MAX_PIXEL)
    y = torch.from_numpy(labels.astype(np.int64))
    train, test = torch.from_numpy(~test_mask), torch.from_numpy(test_mask)
    return x[train], y[train], x[test], y[test]


class MarkovChain:
    """A random sparse first-order Markov chain over ``vocab_size`` tokens.

    Each token has ``num_successors`` possible next tokens with Dirichlet(1)
    probabilities, so the best achievable loss is the chain's entropy rate,
    at most ``log(num_successors)`` nats, well below the ``log(vocab_size)``
    of an untrained model.
    """

    def __init__(self, *, vocab_size: int, num_successors: int, seed: int):
        rng = np.random.default_rng([seed, _CHAIN_STREAM])
        self.vocab_size = vocab_size
        self.successors_VK = np.stack(
            [rng.choice(vocab_size, size=num_successors, replace=False) for _ in range(vocab_size)]
        )
        self.probs_VK = rng.dirichlet(np.ones(num_successors), size=vocab_size)

    def sample(self, *, num_sequences: int, length: int, rng: np.random.Generator) -> np.ndarray:
        """``[num_sequences, length]`` int64 tokens, first token uniform."""
        tokens = np.empty((num_sequences, length), dtype=np.int64)
        tokens[:, 0] = rng.integers(self.vocab_size, size=num_sequences)
        cdf_VK = np.cumsum(self.probs_VK, axis=1)
        for t in range(1, length):
            current = tokens[:, t - 1]
            u = rng.random(num_sequences)
            # Clip guards against u landing above a last cdf entry of 1 - eps.
            choice = np.minimum((u[:, None] >= cdf_VK[current]).sum(axis=1), cdf_VK.shape[1] - 1)
            tokens[:, t] = self.successors_VK[current, choice]
        return tokens

    def entropy_rate(self) -> float:
        """Entropy of the next token under the stationary distribution, nats."""
        transition_VV = np.zeros((self.vocab_size, self.vocab_size))
        np.add.at(
            transition_VV, (np.arange(self.vocab_size)[:, None], self.successors_VK), self.probs_VK
        )
        eigenvalues, eigenvectors = np.linalg.eig(transition_VV.T)
        stationary = np.abs(np.real(eigenvectors[:, np.argmin(np.abs(eigenvalues - 1.0))]))
        stationary /= stationary.sum()
        row_entropy = -(self.probs_VK * np.log(self.probs_VK)).sum(axis=1)
        return float(stationary @ row_entropy)


def synthetic_token_split(
    *,
    vocab_size: int,
    num_successors: int,
    seq_len: int,
    num_samples: int,
    test_fraction: float,
    data_seed: int,
    train_seed: int,
) -> Split:
    """Sequences from one ``MarkovChain``; targets are inputs shifted by one token.

    The chain and the test sequences depend only on ``data_seed``, so the test
    set stays fixed; the training sequences are fresh draws from the same chain
    for each ``train_seed``.
    """
    chain = MarkovChain(vocab_size=vocab_size, num_successors=num_successors, seed=data_seed)
    num_test = round(test_fraction * num_samples)
    test = chain.sample(
        num_sequences=num_test,
        length=seq_len + 1,
        rng=np.random.default_rng([data_seed, _TEST_STREAM]),
    )
    train = chain.sample(
        num_sequences=num_samples - num_test,
        length=seq_len + 1,
        rng=np.random.default_rng([train_seed, _TRAIN_STREAM]),
    )
    train_t, test_t = torch.from_numpy(train), torch.from_numpy(test)
    return train_t[:, :-1], train_t[:, 1:], test_t[:, :-1], test_t[:, 1:]


def windows(tokens: np.ndarray, seq_len: int) -> tuple[Tensor, Tensor]:
    # Non-overlapping windows; the target of a window's last position is the
    # first token of the next window, hence the one-token overhang.
    num_windows = (len(tokens) - 1) // seq_len
    inputs = tokens[: num_windows * seq_len].reshape(num_windows, seq_len)
    targets = tokens[1 : num_windows * seq_len + 1].reshape(num_windows, seq_len)
    return torch.from_numpy(inputs.astype(np.int64)), torch.from_numpy(targets.astype(np.int64))


def text_split(*, seq_len: int, test_fraction: float) -> Split:
    """Byte-level windows of the shipped novel; the last ``test_fraction`` of it is the test set.

    Raises ``ValueError`` when ``seq_len`` leaves the test part without a window.
    """
    tokens = _text_bytes()
    num_test = round(test_fraction * len(tokens))
    train, test = tokens[:-num_test], tokens[-num_test:]
    if len(test) <= seq_len:
        raise ValueError(
            f"seq_len = {seq_len} is too long for the text corpus: its test part has "
            f"{len(test)} characters; use seq_len < {len(test)} or a larger test_fraction."
        )
    return (*windows(train, seq_len), *windows(test, seq_len))


def decode_text(tokens: Tensor) -> str:
    """The ASCII string of a 1-D tensor of text tokens (for inspection and samples)."""
    return bytes(tokens.to(torch.uint8).tolist()).decode("ascii")
