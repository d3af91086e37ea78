"""Cost model: calibration to the 1-phase point, predictions, programming and endurance."""

import math

import pytest
import torch

from nodes.pcm.cost import MvmMode, PcmCost, WriteCycleCounter, main
from nodes.pcm.periphery import Periphery
from nodes.pcm.tile import Tile

# Le Gallo et al. 2023 via docs/hardware.md §3.1, restated here so the test checks the fit
# against the published figures, not against the config's own defaults.
PUBLISHED_TOPS = 63.1
PUBLISHED_TOPS_PER_WATT = 9.76
NUM_CORES = 64


def cost_model(**overrides) -> PcmCost:
    return PcmCost.Config(**overrides).build()


def test_calibration_point_reproduced():
    cost = cost_model()
    one_phase = cost.mvm(MvmMode())
    assert one_phase.tops(NUM_CORES) == pytest.approx(PUBLISHED_TOPS, rel=0.01)
    assert one_phase.tops_per_watt == pytest.approx(PUBLISHED_TOPS_PER_WATT, rel=0.01)
    # docs/hardware.md §3.1 derived figures: ~205 fJ per MAC, ~133 ns per 256 x 256 MVM.
    assert one_phase.energy_per_mac_j * 1e15 == pytest.approx(205, rel=0.01)
    assert one_phase.time_s * 1e9 == pytest.approx(133, rel=0.01)


def test_fitted_parameters_are_physical():
    cost = cost_model()
    one_phase = cost.mvm(MvmMode())
    assert cost.clock_s > 0 and cost.cell_step_energy_j > 0
    assert min(one_phase.row_drive_j, one_phase.array_j, one_phase.adc_j, one_phase.digital_j) > 0


def test_four_phase_prediction_is_slower_and_costlier(capsys):
    cost = cost_model()
    report = cost.calibration_report(predict_phases=4)
    one, four = report.calibration, report.prediction
    assert four.mode.num_phases == 4
    assert four.time_s > one.time_s
    assert four.energy_per_mac_j > one.energy_per_mac_j
    assert four.tops(NUM_CORES) < one.tops(NUM_CORES)
    assert four.tops_per_watt < one.tops_per_watt
    # Each phase is a full pass; the once-per-MVM affine correction is shared.
    assert four.time_s == pytest.approx(4 * one.time_s)
    assert 3.9 * one.energy_j < four.energy_j < 4 * one.energy_j
    print(report)
    printed = capsys.readouterr().out
    assert "4-phase model (predicted)" in printed
    assert f"{four.tops(NUM_CORES):8.2f}" in printed


def test_main_prints_the_report(capsys):
    main()
    printed = capsys.readouterr().out
    assert (
        "1-phase published" in printed
        and "1-phase model (fitted)" in printed
        and "4-phase" in printed
    )


def test_more_bits_cost_more():
    cost = cost_model()
    base = cost.mvm(MvmMode())
    more_adc = cost.mvm(MvmMode(adc_bits=10))
    more_dac = cost.mvm(MvmMode(dac_bits=10))
    assert more_adc.time_s > base.time_s and more_adc.adc_j == pytest.approx(4 * base.adc_j)
    assert more_dac.time_s > base.time_s and more_dac.array_j > base.array_j


def test_smaller_tiles_need_less_energy_per_mvm_but_not_per_mac():
    cost = cost_model()
    small = cost.mvm(MvmMode(rows=128, cols=128))
    base = cost.mvm(MvmMode())
    assert small.energy_j < base.energy_j
    assert small.energy_per_mac_j > base.energy_per_mac_j  # periphery amortised over fewer MACs


def test_priors_exceeding_the_calibration_budget_rejected():
    with pytest.raises(ValueError, match=r"priors .* more than the .* 9.76 TOPS/W allows"):
        cost_model(adc_energy_j=1e-9)


def test_program_and_verify_cost():
    config = PcmCost.Config()
    cost = config.build()
    mode = MvmMode()
    # Two arrays written in parallel; the fuller one (600 devices -> 3 batches of 256) sets the time.
    program = cost.program([600, 10], mode, num_cores=2)
    verify = cost.verify_read(mode)
    round_s = config.program_pulse_s + verify.time_s
    assert program.num_devices == 610
    assert program.time_s == pytest.approx(3 * config.program_verify_iterations * round_s)
    per_round_j = config.program_pulse_energy_j + verify.energy_j / mode.cols
    assert program.energy_j == pytest.approx(610 * config.program_verify_iterations * per_round_j)
    assert cost.program([0], mode, num_cores=1).time_s == 0.0
    # One core programs the two tiles one after the other: twice the rounds.
    serial = cost.program([600, 10], mode, num_cores=1)
    assert serial.time_s == pytest.approx(2 * program.time_s)
    assert serial.energy_j == pytest.approx(program.energy_j)


def test_write_cycles_count_only_changed_devices():
    counter = WriteCycleCounter((2, 3), pulses_per_write=10)
    first = torch.tensor([[1.0, 0.0, 2.0], [0.0, 5.0, 0.0]])
    assert counter.record(None, first).all()
    second = first.clone()
    second[0, 0] = 1.5
    written = counter.record(first, second)
    assert written.sum().item() == 1
    assert counter.cycles.tolist() == [[20, 10, 10], [10, 10, 10]]
    assert counter.num_programmings == 2


def test_endurance_projection():
    counter = WriteCycleCounter((4,), pulses_per_write=10)
    target = torch.zeros(4)
    for step in range(5):
        new_target = target.clone()
        new_target[0] = step + 1.0  # device 0 rewritten every step, the others once
        counter.record(None if step == 0 else target, new_target)
        target = new_target
    report = counter.endurance(seconds_per_programming=0.5, endurance_cycles=1e8)
    assert report.max_cycles == 50
    assert report.mean_cycles == pytest.approx((50 + 3 * 10) / 4)
    assert report.projected_programmings == pytest.approx(1e8 / 10)
    assert report.projected_lifetime_s == pytest.approx(1e7 * 0.5)


def test_endurance_without_writes_is_unbounded():
    report = WriteCycleCounter((3,), pulses_per_write=10).endurance(1.0, 1e8)
    assert math.isinf(report.projected_lifetime_s)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"calibration_tops": 0.0}, r"calibration_tops = 0\.0"),
        ({"endurance_cycles": -1.0}, r"endurance_cycles = -1\.0"),
        ({"adc_energy_j": -1e-12}, r"adc_energy_j = -1e-12"),
    ],
)
def test_invalid_cost_config_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PcmCost.Config(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"num_phases": 0}, "num_phases = 0"), ({"adc_bits": 17}, "adc_bits = 17")],
)
def test_invalid_mode_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MvmMode(**kwargs)


def test_operating_mode_follows_tile_and_periphery():
    cost = PcmCost.Config(num_phases=2).build()
    mode = cost.operating_mode(Tile.Config(rows=128, cols=64), Periphery.Config(adc_bits=6))
    assert (mode.rows, mode.cols, mode.dac_bits, mode.adc_bits, mode.num_phases) == (
        128,
        64,
        8,
        6,
        2,
    )
    ideal = cost.operating_mode(Tile.Config(), Periphery.Config.ideal())
    assert (ideal.dac_bits, ideal.adc_bits) == (8, 8)


def test_matmul_cost_counts_tiles_and_shares_cores():
    cost = cost_model()
    mode = MvmMode()
    one = cost.mvm(mode)
    # 600 x 600 on 256 x 256 tiles: 3 x 3 = 9 tiles.
    spread = cost.matmul(mode, num_outputs=600, num_inputs=600, batch=10, num_cores=64)
    assert spread.num_mvms == 90 and spread.num_macs == 10 * 600 * 600
    assert spread.time_s == pytest.approx(10 * one.time_s)
    assert spread.energy_j == pytest.approx(90 * one.energy_j)
    crowded = cost.matmul(mode, num_outputs=600, num_inputs=600, batch=10, num_cores=4)
    assert crowded.time_s == pytest.approx(10 * 3 * one.time_s)
    assert crowded.energy_j == pytest.approx(spread.energy_j)
