"""Model zoo: every model is an ordered chain of blocks whose weights stream one block at a time.

Entry point: ``ModelConfig(name=...).build(seed=...)``, an ``nn.Sequential`` of
blocks. ``model_blocks`` and ``check_blocks`` turn a user's model into blocks
and check that they chain; ``group_layers`` makes them the streamed layers.
"""

from core.zoo import GPTShape, ZooEntry
from emulator.zoo.blocks import check_blocks, group_layers, model_blocks, model_positions
from emulator.zoo.config import ModelConfig, default_data_config
from emulator.zoo.registry import ZOO

__all__ = [
    "ZOO",
    "GPTShape",
    "ModelConfig",
    "ZooEntry",
    "check_blocks",
    "default_data_config",
    "group_layers",
    "model_blocks",
    "model_positions",
]
