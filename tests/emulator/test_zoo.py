import pytest
import torch
from torch import nn

from core.data import DataConfig
from emulator.zoo import ZOO, ModelConfig, check_blocks, default_data_config, model_blocks
from emulator.zoo.gpt import Embedding, LMHead, TransformerBlock


def _num_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


class ListModel(nn.Module):
    """A user model in the `blocks` ModuleList form."""

    def __init__(self, attribute: str = "blocks"):
        super().__init__()
        setattr(self, attribute, nn.ModuleList([nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10)]))


def make_user_model() -> nn.Module:
    return ListModel()


def make_not_a_module() -> int:
    return 3


@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_model_builds_and_chains_on_its_default_data(name):
    config = ModelConfig(name=name)
    model = config.build(seed=0)
    assert isinstance(model, nn.Sequential)
    data = default_data_config(config).build(seed=0)
    example = data.input_example(2)
    check_blocks(list(model), example)
    with torch.no_grad():
        logits = model(example)
    expected = (
        (2, data.num_classes)
        if data.task == "classification"
        else (2, example.shape[1], data.num_classes)
    )
    assert logits.shape == expected


def test_gpt_10m_has_at_least_ten_million_parameters():
    model = ModelConfig(name="gpt-10m").build(seed=0)
    assert _num_parameters(model) >= 10_000_000
    assert len(model) == 6 + 2


@pytest.mark.parametrize(
    ("name", "low", "high"), [("gpt-tiny", 100_000, 300_000), ("gpt-text", 200_000, 900_000)]
)
def test_small_gpt_sizes(name, low, high):
    assert low <= _num_parameters(ModelConfig(name=name).build(seed=0)) <= high


def test_gpt_block_layout_and_untied_head():
    model = ModelConfig(name="gpt-tiny").build(seed=0)
    assert isinstance(model[0], Embedding) and isinstance(model[-1], LMHead)
    assert all(isinstance(block, TransformerBlock) for block in model[1:-1])
    assert model[-1].lm_head.weight.data_ptr() != model[0].token_embedding.weight.data_ptr()


def test_gpt_is_causal():
    model = ModelConfig(name="gpt-tiny").build(seed=0).eval()
    tokens = torch.randint(64, (1, 20), generator=torch.Generator().manual_seed(0))
    changed = tokens.clone()
    changed[0, 12] = (changed[0, 12] + 1) % 64
    with torch.no_grad():
        a, b = model(tokens), model(changed)
    torch.testing.assert_close(a[:, :12], b[:, :12], rtol=0, atol=0)
    assert not torch.allclose(a[:, 12:], b[:, 12:])


def test_seeded_init_is_reproducible_and_leaves_global_rng_alone():
    state = torch.get_rng_state()
    a = ModelConfig(name="mlp-digits").build(seed=5).state_dict()
    b = ModelConfig(name="mlp-digits").build(seed=5).state_dict()
    c = ModelConfig(name="mlp-digits").build(seed=6).state_dict()
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["0.0.weight"], c["0.0.weight"])


def test_gpt_overrides_change_the_shape_and_the_default_data():
    config = ModelConfig(
        name="gpt-tiny", num_layers=1, d_model=32, num_heads=2, seq_len=16, vocab_size=20
    )
    model = config.build(seed=0)
    assert len(model) == 3 and model[0].token_embedding.weight.shape == (20, 32)
    data_config = default_data_config(config)
    assert (data_config.name, data_config.seq_len, data_config.vocab_size) == (
        "synthetic-tokens",
        16,
        20,
    )
    check_blocks(list(model), data_config.build(seed=0).input_example())
    assert default_data_config(ModelConfig(name="gpt-text", seq_len=32)).seq_len == 32


def test_default_data_of_classifiers_and_user_models_is_digits():
    assert default_data_config(ModelConfig(name="cnn-digits")) == DataConfig(name="digits")
    assert default_data_config(ModelConfig(name=f"{__name__}:make_user_model")) == DataConfig()


def test_text_model_vocab_must_cover_the_bytes():
    with pytest.raises(ValueError, match="vocab_size = 64 is too small"):
        default_data_config(ModelConfig(name="gpt-text", vocab_size=64))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": "mlp-digits", "num_layers": 2}, "^num_layers = 2 is a GPT size"),
        ({"name": "cnn-digits", "dropout": 0.1}, "^dropout = 0.1 is a GPT size"),
        ({"name": "gpt-tiny", "d_model": 30}, "^d_model = 30 must be a multiple of num_heads = 4"),
        ({"name": "gpt-tiny", "num_layers": 0}, "^num_layers = 0 must be a positive"),
        ({"name": "gpt-tiny", "dropout": 1.0}, r"^dropout = 1.0 must lie in \[0, 1\)"),
    ],
)
def test_bad_overrides_name_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(**kwargs)


def test_unknown_zoo_name_lists_the_valid_ones():
    with pytest.raises(ValueError, match="resnet.*mlp-digits.*'package.module:factory'"):
        ModelConfig(name="resnet")


def test_user_factory_is_imported_and_split_into_blocks():
    model = ModelConfig(name=f"{__name__}:make_user_model").build(seed=0)
    assert isinstance(model, nn.Sequential) and len(model) == 3
    check_blocks(list(model), torch.zeros(2, 64))


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("no_such_module_xyz:make", "cannot import module 'no_such_module_xyz'"),
        (f"{__name__}:missing_factory", "has no callable 'missing_factory'"),
        (f"{__name__}:make_not_a_module", "returned a int, not an nn.Module"),
    ],
)
def test_bad_user_factory_is_named(name, message):
    with pytest.raises(ValueError, match=f"name = '{name}'.*{message}"):
        ModelConfig(name=name).build(seed=0)


# ---------------------------------------------------------------- model_blocks


def test_model_blocks_accepts_the_documented_forms():
    layers = [nn.Linear(4, 4), nn.ReLU()]
    assert model_blocks(nn.Sequential(*layers)) == layers
    assert model_blocks(layers) == layers
    assert len(model_blocks(ListModel("blocks"))) == 3
    assert len(model_blocks(ListModel("layers"))) == 3


def test_model_blocks_rejects_other_modules():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(4, 4), nn.Linear(4, 2)

    with pytest.raises(ValueError, match="Cannot split a Net into blocks.*nn.Sequential"):
        model_blocks(Net())
    with_stray = ListModel()
    with_stray.head = nn.Linear(10, 2)
    with pytest.raises(ValueError, match="parameters outside its `blocks` list \\(head.weight"):
        model_blocks(with_stray)
    with pytest.raises(ValueError, match="holds str"):
        model_blocks([nn.ReLU(), "relu"])


# ---------------------------------------------------------------- check_blocks


def test_check_blocks_names_the_block_that_does_not_chain():
    blocks = [nn.Linear(64, 32), nn.Linear(16, 10)]
    with pytest.raises(
        ValueError,
        match=r"Blocks don't chain: block 1 \(Linear\(in_features=16.*block 0's output.*shape \(2, 32\)",
    ):
        check_blocks(blocks, torch.zeros(2, 64))
    with pytest.raises(ValueError, match=r"block 0 .*example input.*shape \(2, 8\)"):
        check_blocks(blocks, torch.zeros(2, 8))


def test_check_blocks_rejects_batchnorm():
    blocks = [nn.Sequential(nn.Linear(64, 32), nn.BatchNorm1d(32)), nn.Linear(32, 10)]
    with pytest.raises(ValueError, match="Block 0 contains BatchNorm1d.*LayerNorm or nn.GroupNorm"):
        check_blocks(blocks, torch.zeros(2, 64))


def test_check_blocks_rejects_tied_weights():
    embedding = nn.Embedding(10, 8)
    head = nn.Linear(8, 10, bias=False)
    head.weight = embedding.weight
    with pytest.raises(
        ValueError, match="block 1 is the same tensor as 'weight' of block 0 \\(tied"
    ):
        check_blocks([embedding, head], torch.zeros(2, 3, dtype=torch.int64))


def test_check_blocks_rejects_non_tensor_outputs_and_empty_models():
    class Pair(nn.Module):
        def forward(self, x):
            return x, x

    with pytest.raises(ValueError, match="returns a tuple"):
        check_blocks([Pair()], torch.zeros(2, 3))
    with pytest.raises(ValueError, match="no blocks"):
        check_blocks([], torch.zeros(2, 3))


def test_check_blocks_leaves_global_rng_and_gradients_alone():
    blocks = [nn.Linear(4, 4), nn.Dropout(0.5)]
    state = torch.get_rng_state()
    check_blocks(blocks, torch.ones(2, 4))
    assert torch.equal(torch.get_rng_state(), state)
    assert blocks[0].weight.grad is None
