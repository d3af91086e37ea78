"""Layers, and pieces of a dominant layer, over K MemoryX servers: balanced and exact."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from memoryx.checkpoint import (
    load_checkpoint_dir,
    read_manifest,
    save_checkpoint_part,
    write_manifest,
)
from memoryx.optim import Optimizer
from memoryx.shard_plan import (
    BALANCE_TOLERANCE,
    Piece,
    join_pieces,
    parse_piece_key,
    plan_shards,
)
from memoryx.store import ParameterStore
from memoryx.tiers import TieredStore

CONFIG = Optimizer.Config(name="adamw", lr=1e-2, weight_decay=0.1)
# One layer of 5/6 of the parameters: whole layers cannot balance two servers.
SHAPES = [{"w": (8, 4)}, {"big.w": (40, 12), "big.b": (12,)}, {"w": (4, 4), "b": (4,)}]


def _layers(seed: int = 0) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [{n: torch.randn(s, generator=gen) for n, s in layer.items()} for layer in SHAPES]


def _held_numel(shard) -> int:
    return sum(
        sum(p.numel for p in shard.pieces[i])
        if i in shard.pieces
        else sum(int(torch.Size(s).numel()) for s in SHAPES[i].values())
        for i in shard.layers
    )


@pytest.mark.parametrize("num_servers", [2, 3, 4])
def test_a_dominant_layer_is_split_and_the_servers_balance(num_servers):
    shards = plan_shards(SHAPES, num_servers)
    total = sum(int(torch.Size(s).numel()) for layer in SHAPES for s in layer.values())
    held = [_held_numel(s) for s in shards]
    assert sum(held) == total
    # Cut at the exact element: within one element of the share (bound: BALANCE_TOLERANCE).
    assert max(held) - min(held) <= 1
    assert any(1 in s.pieces for s in shards)
    # Every element of every tensor is held exactly once, in order.
    for index, layer in enumerate(SHAPES):
        parts = [s.take(index, _layers()[index]) for s in shards if index in s.layers]
        joined = join_pieces({k: t for part in parts for k, t in part.items()})
        assert list(joined) == list(layer)
        for name, tensor in _layers()[index].items():
            assert torch.equal(joined[name], tensor)


def test_balanced_whole_layers_stay_whole_and_sparsity_never_splits():
    even = [{"w": (10, 10)} for _ in range(4)]
    assert [(s.layers, dict(s.pieces)) for s in plan_shards(even, 2)] == [
        (range(0, 2), {}),
        (range(2, 4), {}),
    ]
    whole = plan_shards(SHAPES, 2, split=False)
    assert not any(s.pieces for s in whole)
    assert BALANCE_TOLERANCE == 0.1
    with pytest.raises(ValueError, match="3 streamed layers.*not split over servers with sparsity"):
        plan_shards(SHAPES, 4, split=False)


def test_piece_keys_carry_the_tensor_and_its_shape():
    piece = Piece("mlp.0.weight", (256, 64), 100, 900)
    assert piece.key == "mlp.0.weight[100:900]of256x64"
    assert parse_piece_key(piece.key) == piece
    assert parse_piece_key("mlp.0.weight") is None
    assert Piece("b", (3,), 0, 3).key == "b"
    with pytest.raises(ValueError, match="cover elements"):
        join_pieces({"w[0:3]of2x3": torch.zeros(3)})


def _stores(shards, layers, tmp_path: Path | None = None):
    stores = []
    for k, shard in enumerate(shards):
        held = [shard.take(i, layers[i]) for i in shard.layers]
        if tmp_path is None:
            stores.append(ParameterStore(held, CONFIG.build(), layer_offset=shard.layers.start))
        else:
            store = TieredStore(
                CONFIG.build(),
                spill_dir=tmp_path / f"spill-{k}",
                ram_budget_bytes=10**7,
                layer_offset=shard.layers.start,
            )
            for tensors in held:
                store.add_layer(tensors)
            stores.append(store.finish())
    return stores


def _train(stores, shards, steps: int = 3) -> None:
    """Elementwise-equal gradients, cut as each server holds its part."""
    for step in range(steps):
        grads = _layers(seed=100 + step)
        for store, shard in zip(stores, shards, strict=True):
            for i in shard.layers:
                store.apply_gradients(i, step, shard.take(i, grads[i]))
        for store in stores:
            store.commit(step)


def _joined_weights(stores, step: int) -> list[dict[str, torch.Tensor]]:
    per_layer: dict[int, dict[str, torch.Tensor]] = {}
    for store in stores:
        for i in store.layer_ids:
            per_layer.setdefault(i, {}).update(store.weights(i, step))
    return [join_pieces(per_layer[i]) for i in sorted(per_layer)]


@pytest.mark.parametrize("tiered", [False, True])
def test_pieces_update_bitwise_like_the_whole_layer(tmp_path, tiered):
    shards = plan_shards(SHAPES, 2)
    whole = _stores(plan_shards(SHAPES, 1), _layers())
    split = _stores(shards, _layers(), tmp_path if tiered else None)
    _train(whole, plan_shards(SHAPES, 1))
    _train(split, shards)
    for got, want in zip(_joined_weights(split, 3), _joined_weights(whole, 3), strict=True):
        assert got.keys() == want.keys()
        for name in want:
            assert torch.equal(got[name], want[name])
    for store in split:
        if isinstance(store, TieredStore):
            store.close()


@pytest.mark.parametrize("tiered", [False, True])
def test_checkpoint_of_pieces_resumes_on_two_servers_or_one(tmp_path, tiered):
    shards = plan_shards(SHAPES, 2)
    split = _stores(shards, _layers(), tmp_path if tiered else None)
    _train(split, shards, steps=2)
    directory = tmp_path / "ckpt"
    parts = [save_checkpoint_part(store, directory)[0] for store in split]
    write_manifest(directory, parts, optimizer=CONFIG)
    files = [e["file"] for e in read_manifest(directory)["layers"]]
    assert len(files) == len(set(files)) == 4  # the split layer: one file per server
    want = _joined_weights(split, 2)

    def spill(name: str) -> dict:
        if not tiered:
            return {"spill_dir": None}
        return {"spill_dir": tmp_path / name, "ram_budget_bytes": 10**7}

    # The same two servers: each takes its own pieces.
    again = [
        load_checkpoint_dir(
            directory,
            CONFIG.build(),
            layers=shard.layers,
            pieces={i: shard.keys(i) for i in shard.pieces},
            **spill(f"again-{k}"),
        )
        for k, shard in enumerate(shards)
    ]
    # One server: the split layer joined from its pieces, its optimizer state too.
    one = [load_checkpoint_dir(directory, CONFIG.build(), **spill("one"))]
    for stores in (again, one):
        for got, expected in zip(_joined_weights(stores, 2), want, strict=True):
            assert all(torch.equal(got[n], expected[n]) for n in expected)
    # Training on from the checkpoint matches training on without it.
    _train_from(split, shards, 2)
    _train_from(one, plan_shards(SHAPES, 1), 2)
    for got, expected in zip(_joined_weights(one, 3), _joined_weights(split, 3), strict=True):
        assert all(torch.equal(got[n], expected[n]) for n in expected)
    for store in split + again + one:
        if isinstance(store, TieredStore):
            store.close()


def _train_from(stores, shards, step: int) -> None:
    grads = _layers(seed=100 + step)
    for store, shard in zip(stores, shards, strict=True):
        for i in shard.layers:
            store.apply_gradients(i, step, shard.take(i, grads[i]))
        store.commit(step)
