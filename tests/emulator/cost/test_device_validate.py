"""Device-level rows of ``wafer validate``: what each predicts, and bad entries.

The experiments are cached per argument set, so these tests share the runs of
``test_cost_cli.py``'s ``wafer validate`` (same arguments as references.yaml).
"""

from __future__ import annotations

import pytest

from emulator.cost import device_validate
from emulator.cost.validate import Reference, load_references, predict_reference
from nodes.photonic.cost import PhaseShifter, PhotonicCost


def reference(ref_id: str) -> Reference:
    (ref,) = [r for r in load_references() if r.id == ref_id]
    return ref


def test_device_rows_are_present_with_sources():
    refs = {r.id: r for r in load_references()}
    for ref_id in ("lightmatter-power", "ffm-reaches-ideal", "pcm-drift-1-day"):
        assert refs[ref_id].role == "validation" and refs[ref_id].source
    assert refs["taichi-efficiency"].role == "calibration"


def test_lightmatter_row_is_the_cost_models_prediction_with_mems_shifters():
    ref = reference("lightmatter-power")
    cost = PhotonicCost.Config().build()
    expected = cost.predict_power_w(65.5, 64, PhaseShifter.Config(technology="mems"))
    assert predict_reference(ref) == pytest.approx(expected)
    assert 40.0 < predict_reference(ref) < 160.0  # within 2x of ~80 W


def test_taichi_calibration_row_agrees_by_construction():
    assert predict_reference(reference("taichi-efficiency")) == pytest.approx(160.82, rel=1e-9)


def test_ffm_row_trains_in_situ_on_the_uncalibrated_device():
    ref = reference("ffm-reaches-ideal")
    result = device_validate.insitu_result(ref.device, ref.mesh_size, ref.steps, ref.seed)
    # The uncalibrated chip ruins the twin-trained network; FFM on the same chip recovers it.
    assert result.deployed_accuracy < 0.5 * result.twin_accuracy
    assert predict_reference(ref) == pytest.approx(result.ffm_accuracy / result.twin_accuracy)
    assert result.ffm_losses[-1] < result.ffm_losses[0]


@pytest.mark.parametrize(
    ("quantity", "missing"),
    [
        ("photonic_power_w", "tops, mesh_size, technology"),
        ("ffm_over_twin_accuracy", "device, mesh_size, steps"),
        ("pcm_drift_retention", "model, drift_time_s, steps"),
    ],
)
def test_device_rows_name_their_missing_fields(quantity, missing):
    with pytest.raises(ValueError, match=f"needs {missing}"):
        Reference(
            id="x",
            role="validation",
            claim="c",
            source="s",
            quantity=quantity,
            value=1.0,
            tolerance=0.1,
        )
