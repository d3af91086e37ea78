"""Crossbar periphery: DACs, ADCs, output noise, noise management and bound management.

Units are normalised the way aihwkit's IOParameters are (Rasch et al., Nat. Commun. 14, 5282,
2023): the DAC range is [-1, 1], a normalised weight (G+ - G-) / g_max lies in [-1, 1], so a
full-scale input on a full-scale weight gives one output unit, and the ADC converts
[-adc_bound, adc_bound] in those units.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from core.config import doc

_MAX_CONVERTER_BITS = 16


def _check_bits(name: str, bits: int | None) -> None:
    if bits is not None and not 2 <= bits <= _MAX_CONVERTER_BITS:
        raise ValueError(
            f"{name} = {bits} is not valid for Periphery; use 2 to {_MAX_CONVERTER_BITS} bits "
            "(sign included), or null for an ideal converter."
        )


class Quantizer:
    """Symmetric uniform converter over [-bound, bound]: 2^(bits-1) - 1 levels per sign."""

    def __init__(self, bits: int | None, bound: float) -> None:
        self.bits = bits
        self.bound = bound
        self.step = None if bits is None else bound / (2 ** (bits - 1) - 1)

    def __call__(self, value: Tensor) -> Tensor:
        clipped = value.clamp(-self.bound, self.bound)
        if self.step is None:
            return clipped
        return torch.round(clipped / self.step) * self.step


class Periphery:
    """Converts a tile's digital inputs to pulses and its column currents back to numbers."""

    @dataclass(kw_only=True)
    class Config:
        # Le Gallo et al. 2023 (docs/hardware.md §3.3): 8-bit inputs and outputs.
        dac_bits: int | None = doc(
            "input DAC resolution incl. sign, bits (null = ideal)", default=8
        )
        adc_bits: int | None = doc(
            "output ADC resolution incl. sign, bits (null = ideal)", default=8
        )
        # Rasch et al. 2023 standard HWA setting (aihwkit out_bound = 10).
        adc_bound: float = doc("ADC full scale, normalised output units (+-)", default=10.0)
        # docs/hardware.md §3.3 "~0.04 to 0.06"; aihwkit out_noise = 0.04 (Rasch et al. 2023) is
        # in normalised output units, not a fraction of the +-adc_bound span.
        output_noise: float = doc(
            "std of additive Gaussian noise before the ADC, normalised output units", default=0.04
        )
        noise_management: bool = doc(
            "scale each input vector by its max|x| to fill the DAC range", default=True
        )
        # aihwkit's iterative bound management re-reads a few times; 3 halvings = 8x headroom.
        bound_management_rounds: int = doc(
            "re-reads with halved inputs when an output saturates, count", default=3
        )

        def __post_init__(self) -> None:
            _check_bits("dac_bits", self.dac_bits)
            _check_bits("adc_bits", self.adc_bits)
            if not self.adc_bound > 0:
                raise ValueError(
                    f"adc_bound = {self.adc_bound} is not valid for Periphery; use a full scale > 0."
                )
            if self.adc_bits is not None and math.isinf(self.adc_bound):
                raise ValueError(
                    f"adc_bound = {self.adc_bound} is not valid for Periphery with adc_bits = {self.adc_bits}; "
                    "a quantising ADC needs a finite full scale (or set adc_bits to null)."
                )
            if self.output_noise < 0:
                raise ValueError(
                    f"output_noise = {self.output_noise} is not valid for Periphery; use a std >= 0."
                )
            if self.bound_management_rounds < 0:
                raise ValueError(
                    f"bound_management_rounds = {self.bound_management_rounds} is not valid for Periphery; "
                    "use a count >= 0 (0 switches bound management off)."
                )

        @classmethod
        def ideal(cls) -> Periphery.Config:
            """Exact converters with unbounded range and no noise."""
            return cls(
                dac_bits=None,
                adc_bits=None,
                adc_bound=math.inf,
                output_noise=0.0,
                bound_management_rounds=0,
            )

        def build(self) -> Periphery:
            return Periphery(self)

    def __init__(self, config: Periphery.Config) -> None:
        self.config = config
        self.dac = Quantizer(config.dac_bits, 1.0)
        self.adc = Quantizer(config.adc_bits, config.adc_bound)

    def normalize_inputs(self, x_BPK: Tensor) -> tuple[Tensor, Tensor]:
        """Inputs divided by their per-vector max|x| (noise management), and that scale."""
        if not self.config.noise_management:
            return x_BPK, torch.ones(x_BPK.shape[:-1], dtype=x_BPK.dtype)
        scale_BP = x_BPK.abs().amax(dim=-1)
        scale_BP = torch.where(scale_BP > 0, scale_BP, torch.ones_like(scale_BP))
        return x_BPK / scale_BP[..., None], scale_BP

    def convert_outputs(
        self, y_analog: Tensor, generator: torch.Generator
    ) -> tuple[Tensor, Tensor]:
        """ADC codes (as values) after output noise, and which vectors hit the ADC rail."""
        if self.config.output_noise > 0:
            noise = torch.randn(y_analog.shape, generator=generator, dtype=y_analog.dtype)
            y_analog = y_analog + self.config.output_noise * noise
        saturated = (y_analog.abs() >= self.adc.bound).any(dim=-1)
        return self.adc(y_analog), saturated

    def read(
        self,
        x_BPK: Tensor,
        num_tiles_per_input: int,
        analog: Callable[[Tensor], Tensor],
        generator: torch.Generator,
    ) -> Tensor:
        """Digital tile outputs y_BPQN for inputs x_BPK shared by Q tiles each.

        ``analog`` maps DAC values x_BPQK to column sums y_BPQN. Each tile (b, p, q) that
        saturates is read again with its inputs halved (bound management), up to
        ``bound_management_rounds`` times; the halving is undone digitally.
        """
        x_norm_BPK, scale_BP = self.normalize_inputs(x_BPK)
        x_norm_BPQK = x_norm_BPK[:, :, None, :].expand(-1, -1, num_tiles_per_input, -1)
        factor_BPQ = torch.ones(x_norm_BPQK.shape[:-1], dtype=x_BPK.dtype)
        pending_BPQ = torch.ones(factor_BPQ.shape, dtype=torch.bool)
        result_BPQN = None
        for round_index in range(self.config.bound_management_rounds + 1):
            y_BPQN, saturated_BPQ = self.convert_outputs(
                analog(self.dac(x_norm_BPQK * factor_BPQ[..., None])), generator
            )
            y_BPQN = y_BPQN / factor_BPQ[..., None]
            result_BPQN = (
                y_BPQN
                if result_BPQN is None
                else torch.where(pending_BPQ[..., None], y_BPQN, result_BPQN)
            )
            pending_BPQ = pending_BPQ & saturated_BPQ
            if round_index == self.config.bound_management_rounds or not pending_BPQ.any():
                break
            factor_BPQ = torch.where(pending_BPQ, factor_BPQ / 2, factor_BPQ)
        return result_BPQN * scale_BP[:, :, None, None]


__all__ = ["Periphery", "Quantizer"]
