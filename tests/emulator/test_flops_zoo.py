"""Every zoo model's streamed layers: the FLOPs a run counts equal FlopCounterMode's."""

from __future__ import annotations

import pytest

from core.cost.flops import analytic_block
from core.cost.profile import block_flops, block_matmuls, counted_flops, hooked_matmuls
from emulator.config import load_config
from emulator.prepare import prepare_layers
from emulator.zoo import ZOO

#: Zoo models made only of standard layers: counted from shapes, not by FlopCounterMode.
SHAPE_COUNTED = {"mlp-digits", "cnn-digits"}


@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_layers_count_as_the_flop_counter_does(name):
    config = load_config(None, {"model.name": name, "batch_size": 8, "num_nodes": 2})
    layers, dataset = prepare_layers(config)
    # A node's shard of the batch, as a training step sees it.
    x = dataset.train_inputs[:4]
    for index, layer in enumerate(layers):
        shape_counted = analytic_block(
            layer, tuple(x.shape), x.dtype, differentiate_input=index > 0
        )
        assert (shape_counted is not None) == (name in SHAPE_COUNTED)
        forward, backward, y = block_flops(layer, x, differentiate_input=index > 0)
        reference = counted_flops(layer, x, differentiate_input=index > 0)
        assert (forward, backward) == reference[:2]
        assert (y.shape, y.dtype) == (reference[2].shape, reference[2].dtype)
        assert block_matmuls(layer, x) == hooked_matmuls(layer, x)
        x = reference[2]
