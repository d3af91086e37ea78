"""Which parameters are sparse, and with which settings.

``select_parameters`` resolves a ``Sparsity.Config`` against a model's
parameter names and shapes. Patterns are shell-style globs (``fnmatch``) over
full parameter names. Each explicit pattern must match at least one parameter:
a filter that silently matches nothing is an error, not a no-op.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from memoryx.sparsity.masks import InitMethod, num_to_prune
from memoryx.sparsity.schedules import Schedule

if TYPE_CHECKING:
    from memoryx.sparsity.config import Sparsity

# docs/hardware.md §2.1 (the vendor's model-zoo default): every parameter with
# more than one dimension, except names containing these words.
DEFAULT_EXCLUDED_NAME_PARTS: tuple[str, ...] = ("embedding", "norm", "lm_head")

#: Parameter names quoted in an error message, at most.
_NUM_EXAMPLE_NAMES = 6


@dataclass(frozen=True)
class ParamSparsity:
    """The sparsity settings of one selected parameter, schedules built."""

    name: str
    shape: tuple[int, ...]
    source: (
        str  # the part of the config that selected it, for messages: "param_filter", "groups[1]"
    )
    sparsity: Schedule
    drop_fraction: Schedule | None  # None for algorithms that never drop (static, gmp)
    init_method: InitMethod
    seed: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def num_pruned(self, step: int) -> int:
        """Entries the mask prunes at ``step``: exactly ``round(sparsity(step) * numel)``."""
        return num_to_prune(self.sparsity.value(step), self.numel)


def is_default_sparse(name: str, shape: Sequence[int]) -> bool:
    """The default filter: more than one dimension, and no excluded word in the name."""
    lowered = name.lower()
    return len(shape) > 1 and not any(part in lowered for part in DEFAULT_EXCLUDED_NAME_PARTS)


def _examples(names: Sequence[str]) -> str:
    shown = ", ".join(repr(n) for n in names[:_NUM_EXAMPLE_NAMES])
    more = ", ..." if len(names) > _NUM_EXAMPLE_NAMES else ""
    return f"{shown}{more} ({len(names)} in all)"


def match_patterns(patterns: Sequence[str], names: Sequence[str], where: str) -> list[str]:
    """Names matched by any of ``patterns``, in ``names`` order; every pattern must match one."""
    matched: set[str] = set()
    for pattern in patterns:
        hits = [name for name in names if fnmatch.fnmatchcase(name, pattern)]
        if not hits:
            raise ValueError(
                f"{where} pattern {pattern!r} matches no parameter; patterns are shell-style "
                f"globs over full parameter names, which here are {_examples(names)}."
            )
        matched.update(hits)
    return [name for name in names if name in matched]


def select_parameters(
    config: Sparsity.Config, named_shapes: Mapping[str, Sequence[int]]
) -> dict[str, ParamSparsity]:
    """The sparse parameters of a model and their settings, in ``named_shapes`` order.

    ``groups`` are resolved first; a parameter that two groups match is an
    error. The top-level ``sparsity`` (if set) then covers the parameters that
    ``param_filter`` (or the default filter) selects and no group claimed.
    """
    names = list(named_shapes)
    chosen: dict[str, ParamSparsity] = {}

    def add(name: str, source: str, sparsity, drop_fraction, init_method: InitMethod) -> None:
        chosen[name] = ParamSparsity(
            name=name,
            shape=tuple(named_shapes[name]),
            source=source,
            sparsity=config.sparsity_schedule(sparsity).build(config.update),
            drop_fraction=config.drop_fraction_schedule(drop_fraction, config.update),
            init_method=init_method,
            seed=config.seed,
        )

    for index, group in enumerate(config.groups):
        source = f"groups[{index}]"
        for name in match_patterns(group.param_filter, names, f"{source}.param_filter"):
            if name in chosen:
                raise ValueError(
                    f"parameter {name!r} matches both {chosen[name].source} and {source}; "
                    "narrow the patterns so that each parameter falls in one group."
                )
            init_method = group.init_method or config.init_method
            drop_fraction = (
                group.drop_fraction if group.drop_fraction is not None else config.drop_fraction
            )
            add(name, source, group.sparsity, drop_fraction, init_method)

    if config.sparsity is not None:
        if config.param_filter is None:
            selected = [name for name in names if is_default_sparse(name, named_shapes[name])]
            if not selected:
                raise ValueError(
                    "the default param_filter (parameters with more than one dimension, "
                    f"excluding names containing {', '.join(DEFAULT_EXCLUDED_NAME_PARTS)}) "
                    f"matches no parameter among {_examples(names)}; set param_filter."
                )
        else:
            selected = match_patterns(config.param_filter, names, "param_filter")
        for name in selected:
            if name not in chosen:
                add(name, "param_filter", config.sparsity, config.drop_fraction, config.init_method)

    return {name: chosen[name] for name in names if name in chosen}


__all__ = [
    "DEFAULT_EXCLUDED_NAME_PARTS",
    "ParamSparsity",
    "is_default_sparse",
    "match_patterns",
    "select_parameters",
]
