"""Turning a user's model into the ordered blocks the emulator streams, and checking them."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from core.cost.profile import shape_forward

ACCEPTED_MODELS = (
    "The emulator trains a model as an ordered chain of blocks: block i's output is "
    "block i+1's input, the first block takes the data set's inputs and the last one "
    "returns logits. Give it an nn.Sequential, a Python list of modules, or a module "
    "whose only parameters sit in an nn.ModuleList attribute named `blocks` or `layers`; "
    "put any reshaping between blocks inside a block (e.g. nn.Flatten), because a custom "
    "forward() is not used."
)


def model_blocks(module: nn.Module | list[nn.Module]) -> list[nn.Module]:
    """The blocks of ``module`` in order; ``ValueError`` for any other kind of model."""
    if isinstance(module, list):
        strays = [type(item).__name__ for item in module if not isinstance(item, nn.Module)]
        if strays:
            raise ValueError(
                f"The list holds {', '.join(strays)}, not nn.Module blocks. {ACCEPTED_MODELS}"
            )
        return list(module)
    if isinstance(module, nn.Sequential):
        return list(module)
    if isinstance(module, nn.Module):
        for attribute in ("blocks", "layers"):
            blocks = getattr(module, attribute, None)
            if not isinstance(blocks, nn.ModuleList):
                continue
            inside = {id(p) for p in blocks.parameters()}
            outside = [name for name, p in module.named_parameters() if id(p) not in inside]
            if outside:
                raise ValueError(
                    f"{type(module).__name__} has parameters outside its `{attribute}` list "
                    f"({', '.join(outside[:3])}{', ...' if len(outside) > 3 else ''}), which "
                    f"would never be streamed or trained. {ACCEPTED_MODELS}"
                )
            return list(blocks)
    raise ValueError(f"Cannot split a {type(module).__name__} into blocks. {ACCEPTED_MODELS}")


def _summary(block: nn.Module, limit: int = 120) -> str:
    text = " ".join(repr(block).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_no_batchnorm(blocks: list[nn.Module]) -> None:
    for index, block in enumerate(blocks):
        for name, sub in block.named_modules():
            if isinstance(sub, _BatchNorm):
                where = f" (submodule {name!r})" if name else ""
                raise ValueError(
                    f"Block {index} contains {type(sub).__name__}{where}. BatchNorm keeps running "
                    "statistics that would differ on every data-parallel node and be updated on "
                    "each of them, and normalizes over each node's shard instead of the global "
                    "batch; use nn.LayerNorm or nn.GroupNorm instead."
                )


def _check_no_shared_parameters(blocks: list[nn.Module]) -> None:
    owner: dict[int, tuple[int, str]] = {}
    for index, block in enumerate(blocks):
        for name, parameter in block.named_parameters():
            first = owner.setdefault(id(parameter), (index, name))
            if first[0] != index:
                raise ValueError(
                    f"Parameter {name!r} of block {index} is the same tensor as {first[1]!r} of "
                    f"block {first[0]} (tied weights). Each block's weights stream and update on "
                    "their own, so a parameter may belong to one block only; untie them (e.g. give "
                    "the output head its own weight instead of reusing the embedding)."
                )


def group_layers(blocks: list[nn.Module]) -> list[nn.Module]:
    """Streamed layers: each block with parameters, with parameterless blocks folded in.

    A block without weights (an activation, a reshape) streams nothing, so
    it runs as part of the layer before it (or after it, at the start).
    """
    groups: list[list[nn.Module]] = []
    pending: list[nn.Module] = []
    for block in blocks:
        has_params = any(True for _ in block.parameters())
        if has_params:
            groups.append([*pending, block])
            pending = []
        elif groups:
            groups[-1].append(block)
        else:
            pending.append(block)
    if not groups:
        raise ValueError("the model has no parameters to train; at least one block needs weights.")
    groups[-1].extend(pending)
    return [g[0] if len(g) == 1 else nn.Sequential(*g) for g in groups]


def check_blocks(blocks: list[nn.Module], example_input: Tensor) -> Tensor:
    """Reject BatchNorm, tied weights, and blocks that cannot take the previous block's output.

    Runs ``example_input`` through the blocks without gradients (on CPU, or on the meta
    device: shapes only, ``core.cost.profile.shape_forward``) and returns the last
    block's output. The global random state is left untouched
    (dropout draws from a forked one).
    """
    if not blocks:
        raise ValueError(f"The model has no blocks. {ACCEPTED_MODELS}")
    _check_no_batchnorm(blocks)
    _check_no_shared_parameters(blocks)
    x = example_input
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        for index, block in enumerate(blocks):
            given = "the data set's example input" if index == 0 else f"block {index - 1}'s output"
            try:
                y = shape_forward(block, x)
            except Exception as exc:
                raise ValueError(
                    f"Blocks don't chain: block {index} ({_summary(block)}) fails on {given}, "
                    f"a {x.dtype} tensor of shape {tuple(x.shape)}: {exc}"
                ) from exc
            if not isinstance(y, Tensor):
                raise ValueError(
                    f"Blocks don't chain: block {index} ({_summary(block)}) returns a "
                    f"{type(y).__name__}, but every block must return one tensor."
                )
            x = y
    return x


# Attributes by which models commonly state their context length (nanoGPT, Hugging Face, ...).
_POSITION_ATTRIBUTES = (
    "num_positions",
    "max_seq_len",
    "seq_len",
    "block_size",
    "n_positions",
    "max_position_embeddings",
    "context_length",
)


def model_positions(model: nn.Module) -> int | None:
    """The longest sequence ``model`` takes, if it says: None when it cannot be told.

    Looks for a context-length attribute on the model (or its ``config``), then
    for a learned position table: an ``nn.Embedding`` whose name has "pos" in
    it or is nanoGPT's ``wpe``.
    """
    for holder in (model, getattr(model, "config", None)):
        for attribute in _POSITION_ATTRIBUTES:
            value = getattr(holder, attribute, None)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1].lower()
        if isinstance(module, nn.Embedding) and ("pos" in leaf or leaf == "wpe"):
            return module.num_embeddings
    return None
