"""The initial weights kept on disk for a MemoryX restart before the first checkpoint."""

from __future__ import annotations

import torch
from torch import nn

from emulator.weights import InitialCopy, LayerWeights


class _Counting(LayerWeights):
    """LayerWeights that count how often each layer is made."""

    def __init__(self, layers):
        super().__init__(layers)
        self.made: list[int] = []

    def __getitem__(self, index):
        self.made.append(index)
        return super().__getitem__(index)


def _layers() -> list[nn.Module]:
    torch.manual_seed(0)
    return [nn.Linear(3, 4), nn.Sequential(nn.Linear(4, 4), nn.ReLU()), nn.Linear(4, 2)]


def test_each_layer_is_made_once_written_atomically_and_read_back_from_disk(tmp_path):
    layers = _layers()
    weights = _Counting(layers)
    copy = InitialCopy(tmp_path / "initial", weights)
    assert len(copy) == 3 and copy.layer_bytes(1) == (16 + 4) * 4
    first = [copy[0], copy[1], copy[1], copy[2]]  # a layer split over servers: twice in a row
    assert weights.made == [0, 1, 2]
    copy.release()
    files = sorted(p.name for p in (tmp_path / "initial").iterdir())
    assert files == [f"layer-{i:05d}.safetensors" for i in range(3)]  # no temporary files left
    for index, layer in enumerate(layers):
        again = copy[index]  # a restart's read: from disk, nothing made
        want = {n: p.detach() for n, p in layer.named_parameters()}
        assert list(again) == list(want)  # layer order, not safetensors' sorted order
        for name, tensor in want.items():
            assert torch.equal(again[name], tensor)
    assert weights.made == [0, 1, 2]
    assert torch.equal(first[1]["0.weight"], layers[1][0].weight.detach())
    copy.remove()
    assert not (tmp_path / "initial").exists()


def test_a_load_cut_short_goes_on_making_the_layers_not_yet_written(tmp_path):
    weights = _Counting(_layers())
    copy = InitialCopy(tmp_path / "initial", weights)
    copy[0]
    # A restart reads from the start: layer 0 from disk, the rest made as before.
    got = [copy[i] for i in range(3)]
    assert weights.made == [0, 1, 2]
    assert torch.equal(got[2]["weight"], weights.layers[2].weight.detach())


def test_weights_made_from_a_recorded_initialization_are_remade_not_written(tmp_path):
    from emulator.zoo.deferred import build_deferred

    def factory():
        return nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 4), nn.Linear(4, 2))

    torch.manual_seed(0)
    whole = factory()
    torch.manual_seed(0)
    module, init = build_deferred(factory)
    weights = LayerWeights(list(module), init)
    assert weights.remakeable and not LayerWeights(list(whole)).remakeable
    copy = InitialCopy(tmp_path / "initial", weights)
    first = [copy[i] for i in range(3)]
    copy.release()
    assert not (tmp_path / "initial").exists()  # nothing on disk: a third of the state less
    # A restart's reads, in any order: made again, bitwise the whole build's.
    for index in (2, 0, 1):
        again = copy[index]
        for name, tensor in whole[index].named_parameters():
            assert torch.equal(again[name], tensor.detach())
            assert torch.equal(first[index][name], tensor.detach())
    copy.remove()
