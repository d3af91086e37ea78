"""Sparsity schedules at known points, and the {freq, start, stop} update schedule."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest

from core.config import field_docs, from_dict
from memoryx.sparsity.schedules import (
    SCHEDULES,
    ConstantSchedule,
    CosineSchedule,
    CyclingSchedule,
    ExpSchedule,
    LinearSchedule,
    PowerSchedule,
    Schedule,
    UpdateSchedule,
)


@dataclass(kw_only=True)
class _Holder:
    """A config with a schedule field: mappings pick a kind only inside a parent config."""

    schedule: Schedule.Config


def _load(mapping: dict) -> Schedule.Config:
    return from_dict(_Holder, {"schedule": mapping}).schedule


def test_update_schedule_steps() -> None:
    update = UpdateSchedule.Config(freq=3, start=2, stop=11).build()
    assert update.update_steps(20) == [2, 5, 8]
    assert UpdateSchedule.Config(freq=1).build().update_steps(4) == [0, 1, 2, 3]
    # No stop: keeps updating.
    assert UpdateSchedule.Config(freq=5, start=1).build().update_steps(22) == [1, 6, 11, 16, 21]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(freq=0), "freq = 0 must be at least 1"),
        (dict(freq=1, start=-1), "start = -1 must be a step index"),
        (dict(freq=1, start=5, stop=5), "stop = 5 must be greater than start = 5"),
    ],
)
def test_update_schedule_rejects_bad_input(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        UpdateSchedule.Config(**kwargs)


def test_constant() -> None:
    schedule = ConstantSchedule.Config(value=0.7).build()
    assert [schedule.value(t) for t in (0, 10, 10**6)] == [0.7, 0.7, 0.7]


def test_linear_ramp_is_clamped_outside_its_window() -> None:
    schedule = LinearSchedule.Config(init=0.1, final=0.5, begin=10, end=50).build()
    assert schedule.value(0) == pytest.approx(0.1)
    assert schedule.value(10) == pytest.approx(0.1)
    assert schedule.value(30) == pytest.approx(0.3)
    assert schedule.value(50) == pytest.approx(0.5)
    assert schedule.value(90) == pytest.approx(0.5)


def test_power_is_zhu_and_gupta_cubic() -> None:
    # s_t = s_f + (s_i - s_f) (1 - (t - t0) / (n dt))^3 with s_i = 0, s_f = 0.9, t0 = 0, n dt = 100.
    schedule = PowerSchedule.Config(init=0.0, final=0.9, begin=0, end=100).build()
    assert schedule.value(0) == 0.0
    assert schedule.value(50) == pytest.approx(0.9 - 0.9 * 0.5**3)
    assert schedule.value(90) == pytest.approx(0.9 - 0.9 * 0.1**3)
    assert schedule.value(100) == pytest.approx(0.9)
    assert schedule.value(1000) == pytest.approx(0.9)
    quadratic = PowerSchedule.Config(init=0.2, final=0.6, begin=0, end=10, exponent=2).build()
    assert quadratic.value(5) == pytest.approx(0.6 - 0.4 * 0.25)


def test_cosine_is_rigl_drop_fraction_decay() -> None:
    # Evci et al. 2020: alpha / 2 (1 + cos(t pi / T_end)), alpha = 0.3, T_end = 100.
    schedule = CosineSchedule.Config(init=0.3, begin=0, end=100).build()
    for step in (0, 25, 50, 75, 100):
        assert schedule.value(step) == pytest.approx(0.15 * (1 + math.cos(math.pi * step / 100)))
    assert schedule.value(100) == pytest.approx(0.0, abs=1e-15)
    assert schedule.value(200) == pytest.approx(0.0, abs=1e-15)


def test_exp_approaches_its_final_value() -> None:
    schedule = ExpSchedule.Config(init=0.0, final=0.8, decay_steps=10, begin=5).build()
    assert schedule.value(0) == 0.0
    assert schedule.value(5) == 0.0
    assert schedule.value(15) == pytest.approx(0.8 * (1 - math.exp(-1)))
    assert schedule.value(10**4) == pytest.approx(0.8)


def test_cycling_holds_each_value_for_a_period() -> None:
    schedule = CyclingSchedule.Config(values=[0.5, 0.7, 0.9], period=2, begin=4).build()
    assert [schedule.value(t) for t in range(12)] == [
        0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.7, 0.7, 0.9, 0.9, 0.5, 0.5
    ]  # fmt: skip


def test_window_defaults_to_the_update_schedule() -> None:
    update = UpdateSchedule.Config(freq=10, start=20, stop=120)
    ramp = LinearSchedule.Config(init=0.0, final=1.0).build(update)
    assert (ramp.value(20), ramp.value(70), ramp.value(120)) == pytest.approx((0.0, 0.5, 1.0))
    cycling = CyclingSchedule.Config(values=[1.0, 2.0]).build(update)
    assert [cycling.value(t) for t in (0, 20, 29, 30, 40)] == [1.0, 1.0, 1.0, 2.0, 1.0]
    # An explicit window wins over the update's.
    own = LinearSchedule.Config(init=0.0, final=1.0, begin=0, end=10).build(update)
    assert own.value(5) == pytest.approx(0.5)


def test_ramp_without_end_is_an_error() -> None:
    with pytest.raises(ValueError, match="power schedule needs an end step"):
        PowerSchedule.Config(init=0.0, final=0.5).build(UpdateSchedule.Config(freq=10))
    with pytest.raises(ValueError, match="cosine schedule needs an end step"):
        CosineSchedule.Config(init=0.3).build()
    with pytest.raises(ValueError, match="end = 5 must be greater than begin = 5"):
        LinearSchedule.Config(init=0.0, final=1.0, begin=5, end=5)
    with pytest.raises(ValueError, match="needs end > begin"):
        LinearSchedule.Config(init=0.0, final=1.0, begin=50).build(
            UpdateSchedule.Config(freq=1, stop=40)
        )


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (dict(kind="power", init=0.0, final=0.5, exponent=0.0), "exponent = 0.0 must be > 0"),
        (dict(kind="exp", init=0.0, final=0.5, decay_steps=0), "decay_steps = 0.0 must be > 0"),
        (dict(kind="cycling", values=[]), "values must list at least one value"),
        (dict(kind="cycling", values=[0.1], period=0), "period = 0 must be at least 1"),
        (dict(kind="linear", init=0.0, final=1.0, begin=-1), "begin = -1 must be a step index"),
        (
            dict(kind="step", value=1.0),
            "schedule.kind = 'step' is not valid; choose one of 'constant'",
        ),
    ],
)
def test_schedule_configs_reject_bad_input(config: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _load(config)


def test_every_kind_loads_from_a_mapping_and_documents_its_fields() -> None:
    kinds = {schedule.Config.kind_name() for schedule in SCHEDULES}
    assert kinds == {"constant", "linear", "exp", "power", "cosine", "cycling"}
    loaded = _load({"kind": "power", "init": 0, "final": 0.9, "end": 10})
    assert isinstance(loaded, PowerSchedule.Config) and loaded.exponent == 3.0
    for schedule in SCHEDULES:
        assert all(field_docs(schedule.Config).values()), schedule.__name__


def test_value_range_and_monotonicity() -> None:
    assert LinearSchedule.Config(init=0.9, final=0.1).value_range() == (0.1, 0.9)
    assert not LinearSchedule.Config(init=0.9, final=0.1).is_non_decreasing()
    assert PowerSchedule.Config(init=0.0, final=0.9).is_non_decreasing()
    assert not CyclingSchedule.Config(values=[0.1, 0.2]).is_non_decreasing()
    assert CyclingSchedule.Config(values=[0.2, 0.2]).is_non_decreasing()
