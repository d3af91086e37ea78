"""One precision vocabulary: names, wire dtypes, torch dtypes and sizes from one table."""

from __future__ import annotations

import pytest

from core.precision import PRECISIONS, precision_format, wire_precision
from nodes.cs2 import Cs2Backend
from nodes.pcm.backend import PcmBackend
from nodes.photonic.backend import PhotonicBackend


def test_every_streamable_precision_round_trips_through_its_wire_name():
    for name, fmt in PRECISIONS.items():
        if fmt.wire_name is None:
            continue
        assert wire_precision(fmt.wire_name) == name
        assert fmt.torch_dtype.itemsize == fmt.bytes_per_element
        assert str(fmt.torch_dtype) == f"torch.{fmt.wire_name}"


def test_a_cost_model_only_format_has_a_size_but_no_torch_dtype():
    assert precision_format("cbfloat16").bytes_per_element == 2
    with pytest.raises(ValueError, match="exists only in the cost model"):
        _ = precision_format("cbfloat16").torch_dtype


def test_unknown_names_are_refused_with_the_valid_ones():
    with pytest.raises(ValueError, match=r"precision = 'fp8' is not valid; choose one of fp16"):
        precision_format("fp8")
    with pytest.raises(ValueError, match="wire dtype 'int8'"):
        wire_precision("int8")


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_cs2_streams_its_operand_precision(precision):
    config = Cs2Backend.Config(precision=precision)
    fmt = precision_format(precision)
    assert config.wire_precision == precision
    assert config.wire_dtype == fmt.wire_name
    backend = config.build()
    assert backend.wire_dtype == config.wire_dtype
    assert backend.operand_dtype is fmt.torch_dtype


def test_analog_backends_stream_fp32_and_say_so_without_being_built():
    for config in (PcmBackend.Config(), PhotonicBackend.Config.ideal(mesh_size=8)):
        assert config.wire_precision == "fp32"
        assert config.wire_dtype == "float32"
