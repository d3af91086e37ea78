import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from core.config import from_dict
from core.data import BatchSampler, DataConfig, Dataset, loss_sum, num_correct, num_targets
from core.data.sources import TEXT_VOCAB_SIZE, MarkovChain, decode_text

# ---------------------------------------------------------------- sampler


def test_sampler_is_a_pure_function_of_seed_and_step():
    first = BatchSampler(100, 10, seed=3)
    second = BatchSampler(100, 10, seed=3)
    in_order = [first.global_batch(step) for step in range(35)]
    # Out of order (and across epochs back and forth) must give the same batches.
    for step in (34, 0, 17, 3, 34):
        assert torch.equal(second.global_batch(step), in_order[step])
    other_seed = BatchSampler(100, 10, seed=4)
    assert not torch.equal(other_seed.global_batch(0), in_order[0])
    assert in_order[0].dtype == torch.int64 and in_order[0].shape == (10,)


def test_every_sample_seen_once_per_epoch_in_a_fresh_order():
    sampler = BatchSampler(96, 12, seed=0)
    epochs = [torch.cat([sampler.global_batch(e * 8 + s) for s in range(8)]) for e in range(3)]
    for order in epochs:
        assert torch.equal(order.sort().values, torch.arange(96))
    assert not torch.equal(epochs[0], epochs[1])
    assert not torch.equal(epochs[1], epochs[2])


def test_remainder_of_each_epoch_is_dropped():
    sampler = BatchSampler(10, 4, seed=1)
    assert sampler.steps_per_epoch == 2
    epoch0 = torch.cat([sampler.global_batch(0), sampler.global_batch(1)])
    assert len(set(epoch0.tolist())) == 8
    assert torch.equal(sampler.global_batch(2), sampler.epoch_order(1)[:4])


@pytest.mark.parametrize("num_nodes", [1, 2, 4, 8, 16])
def test_shards_concatenate_to_the_global_batch(num_nodes):
    sampler = BatchSampler(64, 16, seed=7)
    for step in (0, 5, 9):
        shards = [sampler.shard(step, rank, num_nodes) for rank in range(num_nodes)]
        assert all(len(shard) == 16 // num_nodes for shard in shards)
        assert torch.equal(torch.cat(shards), sampler.global_batch(step))


def test_shard_needs_batch_divisible_by_nodes():
    sampler = BatchSampler(64, 10, seed=0)
    with pytest.raises(ValueError, match="batch_size = 10.*num_nodes = 4"):
        sampler.shard(0, 0, 4)
    with pytest.raises(ValueError, match="rank = 2"):
        sampler.shard(0, 2, 2)


@pytest.mark.parametrize(
    ("num_samples", "batch_size", "seed", "message"),
    [(10, 11, 0, "batch_size = 11"), (10, 0, 0, "batch_size = 0"), (10, 5, -1, "seed = -1")],
)
def test_sampler_rejects_bad_arguments(num_samples, batch_size, seed, message):
    with pytest.raises(ValueError, match=message):
        BatchSampler(num_samples, batch_size, seed=seed)


def test_negative_step_is_rejected():
    with pytest.raises(ValueError, match="step = -1"):
        BatchSampler(10, 5, seed=0).global_batch(-1)


# ---------------------------------------------------------------- digits


def test_digits_shapes_range_and_stratified_split():
    data = DataConfig(name="digits").build(seed=0)
    assert (data.task, data.num_classes) == ("classification", 10)
    assert data.train_inputs.shape == (1438, 64) and data.test_inputs.shape == (359, 64)
    assert data.train_inputs.dtype == torch.float32 and data.train_targets.dtype == torch.int64
    everything = torch.cat([data.train_inputs, data.test_inputs])
    assert everything.min() == 0.0 and everything.max() == 1.0
    # Pixels are 4-bit counts divided by 16, so x * 16 is an exact integer.
    assert torch.equal(everything * 16, (everything * 16).round())
    train_counts = torch.bincount(data.train_targets, minlength=10)
    test_counts = torch.bincount(data.test_targets, minlength=10)
    for train_count, test_count in zip(train_counts.tolist(), test_counts.tolist(), strict=True):
        assert test_count == round(0.2 * (train_count + test_count))


def test_digits_test_set_is_fixed_regardless_of_run_seed():
    a = DataConfig(name="digits").build(seed=0)
    b = DataConfig(name="digits").build(seed=123)
    assert torch.equal(a.test_inputs, b.test_inputs) and torch.equal(a.test_targets, b.test_targets)
    assert torch.equal(a.train_inputs, b.train_inputs)
    other_split = DataConfig(name="digits", data_seed=1).build(seed=0)
    assert not torch.equal(a.test_inputs, other_split.test_inputs)


def test_input_example():
    data = DataConfig(name="digits").build(seed=0)
    assert torch.equal(data.input_example(3), data.train_inputs[:3])
    with pytest.raises(ValueError, match="batch = 0"):
        data.input_example(0)


# ---------------------------------------------------------------- synthetic tokens


def test_synthetic_tokens_shapes_and_shifted_targets():
    config = DataConfig(name="synthetic-tokens", vocab_size=32, seq_len=16, num_samples=500)
    data = config.build(seed=0)
    assert (data.task, data.num_classes) == ("language-model", 32)
    assert data.train_inputs.shape == (400, 16) and data.test_inputs.shape == (100, 16)
    assert data.train_inputs.dtype == torch.int64
    assert int(data.train_inputs.min()) >= 0 and int(data.train_inputs.max()) < 32
    assert torch.equal(data.train_targets[:, :-1], data.train_inputs[:, 1:])
    assert torch.equal(data.test_targets[:, :-1], data.test_inputs[:, 1:])


def test_synthetic_tokens_are_deterministic_with_fixed_test_set():
    config = DataConfig(name="synthetic-tokens", num_samples=300)
    a, a_again, b = config.build(seed=1), config.build(seed=1), config.build(seed=2)
    assert torch.equal(a.train_inputs, a_again.train_inputs)
    assert not torch.equal(a.train_inputs, b.train_inputs)
    assert torch.equal(a.test_inputs, b.test_inputs)


def test_synthetic_tokens_follow_the_sparse_chain():
    config = DataConfig(name="synthetic-tokens")
    data = config.build(seed=0)
    chain = MarkovChain(vocab_size=64, num_successors=4, seed=config.data_seed)
    current = data.train_inputs.reshape(-1).numpy()
    following = data.train_targets.reshape(-1).numpy()
    allowed = (chain.successors_VK[current] == following[:, None]).any(axis=1)
    assert allowed.all()
    # Plug-in conditional entropy of the observed transitions. N = 3277 * 64
    # ~ 2.1e5 transitions; the estimator's bias is about -(64 * 3) / (2N) ~
    # -5e-4 nats and its standard deviation about sqrt(Var(log p) / N) < 3e-3
    # nats, so 0.03 nats is a >10 sigma tolerance that still catches a wrong
    # chain or sampler (the uniform guess is 3 nats higher).
    pairs = np.zeros((64, 64))
    np.add.at(pairs, (current, following), 1.0)
    conditional = pairs / pairs.sum(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        entropy = -np.nansum(pairs * np.log(conditional)) / pairs.sum()
    assert entropy == pytest.approx(chain.entropy_rate(), abs=0.03)
    assert chain.entropy_rate() < math.log(4) < math.log(64) - 2.5


def test_single_successor_chain_is_deterministic():
    chain = MarkovChain(vocab_size=8, num_successors=1, seed=0)
    assert chain.entropy_rate() == pytest.approx(0.0, abs=1e-12)
    tokens = chain.sample(num_sequences=5, length=10, rng=np.random.default_rng(0))
    assert (tokens[:, 1:] == chain.successors_VK[tokens[:, :-1], 0]).all()


# ---------------------------------------------------------------- text


def test_text_windows_are_contiguous_bytes_of_the_novel():
    data = DataConfig(name="text", seq_len=128).build(seed=0)
    assert (data.task, data.num_classes) == ("language-model", TEXT_VOCAB_SIZE)
    assert data.train_inputs.shape[1] == 128 and data.train_inputs.dtype == torch.int64
    assert int(torch.cat([data.train_inputs, data.test_inputs]).max()) < TEXT_VOCAB_SIZE
    assert decode_text(data.train_inputs[0]).startswith("PRIDE AND PREJUDICE")
    for inputs, targets in (
        (data.train_inputs, data.train_targets),
        (data.test_inputs, data.test_targets),
    ):
        assert torch.equal(targets[:, :-1], inputs[:, 1:])
        assert torch.equal(inputs[1:, 0], targets[:-1, -1])
    # 684,769 bytes: the last 20% (136,954) form the test windows.
    assert len(data.test_inputs) == (136_954 - 1) // 128
    assert "Darcy, as well as Elizabeth, really loved them" in "".join(
        decode_text(row) for row in data.test_inputs[-10:]
    )
    assert torch.equal(
        DataConfig(name="text", seq_len=128).build(seed=9).test_inputs, data.test_inputs
    )


def test_text_rejects_seq_len_longer_than_the_test_part():
    with pytest.raises(ValueError, match="seq_len = 200000"):
        DataConfig(name="text", seq_len=200_000).build(seed=0)


# ---------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"seq_len": 0}, "seq_len"),
        ({"vocab_size": 1}, "vocab_size"),
        ({"num_successors": 0}, "num_successors"),
        ({"vocab_size": 8, "num_successors": 9}, "num_successors"),
        ({"test_fraction": 0.0}, "test_fraction"),
        ({"test_fraction": 1.0}, "test_fraction"),
        ({"num_samples": 2, "test_fraction": 0.2}, "num_samples"),
        ({"data_seed": -1}, "data_seed"),
    ],
)
def test_config_validation_names_the_field(overrides, field):
    with pytest.raises(ValueError, match=f"^{field} = "):
        DataConfig(**overrides)


def test_config_from_dict_rejects_unknown_names_and_keys():
    with pytest.raises(ValueError, match="name = 'mnist' is not valid"):
        from_dict(DataConfig, {"name": "mnist"})
    with pytest.raises(ValueError, match="Unknown config key seqlen"):
        from_dict(DataConfig, {"seqlen": 3})
    assert from_dict(DataConfig, {"name": "text", "seq_len": 32}).seq_len == 32
    assert Dataset.Config is DataConfig


def test_build_rejects_negative_seed():
    with pytest.raises(ValueError, match="seed = -1"):
        DataConfig().build(seed=-1)


# ---------------------------------------------------------------- objectives


def test_loss_sum_over_shards_adds_up_to_the_global_mean():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(8, 5, 11, generator=generator)
    targets = torch.randint(11, (8, 5), generator=generator)
    total = loss_sum("language-model", logits[:4], targets[:4]) + loss_sum(
        "language-model", logits[4:], targets[4:]
    )
    mean = F.cross_entropy(logits.reshape(-1, 11), targets.reshape(-1))
    assert num_targets("language-model", targets) == 40
    torch.testing.assert_close(total / 40, mean)
    classes = torch.randn(6, 3, generator=generator)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    torch.testing.assert_close(
        loss_sum("classification", classes, labels), F.cross_entropy(classes, labels) * 6
    )


def test_num_correct_counts_argmax_hits():
    logits = torch.tensor([[2.0, 1.0], [0.0, 3.0], [5.0, -1.0]])
    assert num_correct("classification", logits, torch.tensor([0, 1, 1])) == 2
    tokens = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    assert num_correct("language-model", tokens, torch.tensor([[0, 0]])) == 1


def test_unknown_task_is_rejected():
    with pytest.raises(ValueError, match="task = 'regression'"):
        num_targets("regression", torch.zeros(3))
