"""The ``Dataset`` a run trains on, and its config.

Every compute node builds its own copy of a shipped data set from the shipped
files (or the seeded generator) and reads only its shard of each global batch,
so shipped training data never crosses the network: ``Dataset.Config.build``
must return bit-identical tensors in every process for the same config and
seed. A user's own data (``path``) is read by the driver alone
(``core.data.user``); the nodes receive its tensors as an actor argument.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from core.config import doc
from core.data import sources, user

Task = Literal["classification", "language-model"]
#: The data sets shipped with the package (``DataConfig.name``).
SHIPPED_DATA = ("digits", "synthetic-tokens", "text")


@dataclass(kw_only=True)
class DataConfig:
    """Which data set to train on, with its size knobs (each names the data sets it applies to)."""

    name: Literal["digits", "synthetic-tokens", "text"] = doc(
        "data set: 8x8 digits, Markov-chain tokens, or the shipped English novel", default="digits"
    )
    seq_len: int = doc("tokens per training sequence, tokens (synthetic-tokens, text)", default=64)
    vocab_size: int = doc("number of distinct tokens, tokens (synthetic-tokens)", default=64)
    num_successors: int = doc(
        "possible next tokens after each token in the Markov chain, tokens (synthetic-tokens)",
        default=4,
    )
    num_samples: int = doc(
        "sequences generated, train plus test, sequences (synthetic-tokens)", default=4096
    )
    test_fraction: float = doc(
        "share of the data held out as the test set, fraction in (0, 1) (all)", default=0.2
    )
    path: str | None = doc(
        "the user's own data, replacing name: a .npz with arrays x, y (optional x_test, y_test), "
        "a .bin of uint16 token ids cut into seq_len windows, or 'package.module:factory' "
        "returning (train, test) torch Datasets; relative paths start at the working directory",
        default=None,
    )
    data_seed: int = doc(
        "seed of the train/test split and of the Markov chain; fixed so the test set "
        "does not move with the run's seed, integer >= 0 (all)",
        default=0,
    )

    def __post_init__(self) -> None:
        if self.seq_len < 1:
            raise ValueError(f"seq_len = {self.seq_len} must be at least 1 token.")
        if self.vocab_size < 2:
            raise ValueError(f"vocab_size = {self.vocab_size} must be at least 2 tokens.")
        if not 1 <= self.num_successors <= self.vocab_size:
            raise ValueError(
                f"num_successors = {self.num_successors} must be between 1 and "
                f"vocab_size = {self.vocab_size}."
            )
        if not 0.0 < self.test_fraction < 1.0:
            raise ValueError(
                f"test_fraction = {self.test_fraction} must lie strictly between 0 and 1."
            )
        num_test = round(self.test_fraction * self.num_samples)
        if not 1 <= num_test < self.num_samples:
            raise ValueError(
                f"num_samples = {self.num_samples} with test_fraction = {self.test_fraction} "
                f"gives {num_test} test sequences; both train and test need at least one "
                f"sequence, e.g. num_samples >= {max(2, round(1 / self.test_fraction))}."
            )
        if self.data_seed < 0:
            raise ValueError(f"data_seed = {self.data_seed} must be a non-negative integer.")
        if self.path is not None:
            if self.name != "digits":
                raise ValueError(
                    f"path = {self.path!r} and name = {self.name!r} both pick the data; "
                    "give only one of them."
                )
            user.check_path(self.path)

    @property
    def from_user(self) -> bool:
        """The user's data: only the driver reads it; nodes get its tensors, never its path."""
        return self.path is not None

    def build(self, *, seed: int) -> Dataset:
        """The data set for a run with ``seed``, identical in every process.

        ``seed`` only picks which training sequences synthetic-tokens draws from
        its chain; digits and text are fixed by the shipped files and
        ``data_seed``, and every test set ignores ``seed``.
        """
        if seed < 0:
            raise ValueError(f"seed = {seed} must be a non-negative integer.")
        if self.path is not None:
            task, split = user.load(
                self.path,
                seq_len=self.seq_len,
                test_fraction=self.test_fraction,
                data_seed=self.data_seed,
            )
            num_classes = 1 + max(int(part.max()) for part in split if part.dtype == torch.int64)
            return Dataset(self.path, task, *split, num_classes=num_classes)
        if self.name == "digits":
            split = sources.digits_split(
                test_fraction=self.test_fraction, split_seed=self.data_seed
            )
            task, num_classes = "classification", 10
        elif self.name == "synthetic-tokens":
            split = sources.synthetic_token_split(
                vocab_size=self.vocab_size,
                num_successors=self.num_successors,
                seq_len=self.seq_len,
                num_samples=self.num_samples,
                test_fraction=self.test_fraction,
                data_seed=self.data_seed,
                train_seed=seed,
            )
            task, num_classes = "language-model", self.vocab_size
        else:
            split = sources.text_split(seq_len=self.seq_len, test_fraction=self.test_fraction)
            task, num_classes = "language-model", sources.TEXT_VOCAB_SIZE
        train_inputs, train_targets, test_inputs, test_targets = split
        return Dataset(
            name=self.name,
            task=task,
            train_inputs=train_inputs,
            train_targets=train_targets,
            test_inputs=test_inputs,
            test_targets=test_targets,
            num_classes=num_classes,
        )


@dataclass
class Dataset:
    """Train and test tensors of one data set.

    Classification (digits): inputs float32 ``[N, 64]`` in [0, 1] (a flattened
    8x8 image; convolutional models reshape it in their first block), targets
    int64 ``[N]``. Language models: inputs and targets int64 ``[N, seq_len]``,
    targets being the inputs shifted by one token.
    """

    Config = DataConfig

    name: str
    task: Task
    train_inputs: Tensor
    train_targets: Tensor
    test_inputs: Tensor
    test_targets: Tensor
    num_classes: int  # classes, or vocabulary size for language models

    @property
    def description(self) -> str:
        """How an error names this data: the shipped set, or the user's file or factory."""
        if self.name in SHIPPED_DATA:
            return f"data set {self.name!r}"
        if user.is_factory_path(self.name):
            return f"data factory {self.name!r}"
        return f"data file {self.name!r}"

    def check_positions(self, num_positions: int | None) -> None:
        """ValueError, naming the data and the fix, if its sequences outrun the model's positions.

        ``num_positions``: the longest sequence the model takes (None: unknown
        or unlimited). Run it before the model sees the data: a too-long
        sequence fails deep inside a position embedding.
        """
        if self.task != "language-model" or num_positions is None:
            return
        seq_len = int(self.train_inputs.shape[1])
        if seq_len > num_positions:
            raise ValueError(
                f"{self.description} has sequences of {seq_len} tokens, but the model has "
                f"{num_positions} positions. Set data.seq_len to at most {num_positions} "
                f"(--seq-len {num_positions}, or YAML data: {{seq_len: {num_positions}}}) "
                "or give the model more positions."
            )

    def check_outputs(self, output_shape: tuple[int, ...]) -> None:
        """ValueError, naming the data and the fix, if a model's output cannot score this data.

        ``output_shape``: the shape of the model's output on ``input_example()``:
        ``[batch, classes]`` for classification, ``[batch, seq_len, vocabulary]``
        for a language model. Every label (token id) of train and test must
        index one of the outputs, or the loss fails inside a node.
        """
        where = self.description
        classification = self.task == "classification"
        expected = "[batch, classes]" if classification else "[batch, seq_len, vocabulary]"
        if len(output_shape) != (2 if classification else 3):
            raise ValueError(
                f"{where} is a {self.task} set, so the model's output must be {expected}, "
                f"but it is {list(output_shape)}. Make the last block return one score per "
                f"{'class' if classification else 'token of the vocabulary'}."
            )
        num_outputs = output_shape[-1]
        parts = [self.train_targets, self.test_targets]
        if not classification:
            parts += [self.train_inputs, self.test_inputs]
        largest = max(int(part.max()) for part in parts)
        if largest < num_outputs:
            return
        if classification:
            raise ValueError(
                f"{where} has class labels up to {largest} ({largest + 1} classes), but the "
                f"model's last block gives {num_outputs} outputs per sample, one per class. "
                f"Give the model's head at least {largest + 1} outputs "
                f"(e.g. nn.Linear(..., {largest + 1})) or relabel the data to 0..{num_outputs - 1}."
            )
        raise ValueError(
            f"{where} has token ids up to {largest}, but the model's last block scores "
            f"{num_outputs} tokens. Give the model a vocabulary of at least {largest + 1} "
            f"tokens (embedding and head) or map the data's ids below {num_outputs}."
        )

    @property
    def num_train(self) -> int:
        return len(self.train_inputs)

    def input_example(self, batch: int = 2) -> Tensor:
        """The first ``batch`` training inputs, to check that a model's blocks chain."""
        if not 1 <= batch <= self.num_train:
            raise ValueError(f"batch = {batch} must be between 1 and {self.num_train} samples.")
        return self.train_inputs[:batch].clone()
