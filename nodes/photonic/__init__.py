"""Photonic compute physics in plain torch: MZI meshes, non-idealities, diffraction, FFM, DFA, cost.

Modules, by concept:

- ``elements``: reciprocal optical elements (forward, reverse = transpose, phase gradients).
- ``mesh``: Clements mesh layout and its differentiable column-by-column forward model.
- ``clements``: decomposition of unitaries, SVD programs of any matrix, tiling.
- ``nonideal``: non-idealities as strategy objects; ``calibration``: the measured-and-corrected
  phase calibration a real deployment performs.
- ``device``: a physical MZI unit with hidden fabrication errors, and its ideal twin.
- ``diffraction``: angular-spectrum propagation, diffractive stacks, Taichi units, multi-path.
- ``ffm``: fully forward mode gradients; ``dfa``: direct feedback alignment.
- ``cost``: time and energy, calibrated to Taichi, with phase-shifter technologies as
  strategies; ``insitu``: twin vs in-situ training.
"""

from nodes.photonic.calibration import PhaseCalibration, PhaseController
from nodes.photonic.clements import (
    MatrixProgram,
    TiledProgram,
    UnitPhases,
    clements_decompose,
    clements_reconstruct,
    svd_decompose,
    svd_reconstruct,
    tile_matrix,
    tiled_apply,
    tiled_reconstruct,
    unit_elements,
    unit_gradients,
)
from nodes.photonic.cost import (
    Cost,
    PhaseShifter,
    PhotonicCost,
    Prediction,
    Reconfiguration,
    predictions,
)
from nodes.photonic.device import PhotonicCore, TiledEngine
from nodes.photonic.dfa import DirectFeedbackAlignment
from nodes.photonic.diffraction import (
    AngularSpectrum,
    DiffractionMedium,
    DiffractiveStack,
    MultiPathClassifier,
    TaichiUnit,
)
from nodes.photonic.elements import OpticalElement, PhaseScreen, propagate, propagate_reverse
from nodes.photonic.ffm import check_forward_only, ffm_backward, ffm_forward
from nodes.photonic.insitu import InsituExperiment, InsituResult, PhotonicClassifier, train_digital
from nodes.photonic.mesh import MeshLayout, MeshPhases, MZIMesh, mesh_elements, transfer_matrix
from nodes.photonic.nonideal import (
    DetectionNoise,
    InsertionLoss,
    OutputEffect,
    PhaseEffect,
    PhaseError,
    PhaseQuantization,
    Readout,
    ShifterGainError,
    SplitterImbalance,
    ThermalCrosstalk,
)
from nodes.photonic.preset import load_preset

__all__ = [
    "AngularSpectrum",
    "Cost",
    "DetectionNoise",
    "DiffractionMedium",
    "DiffractiveStack",
    "DirectFeedbackAlignment",
    "InsertionLoss",
    "InsituExperiment",
    "InsituResult",
    "MZIMesh",
    "MatrixProgram",
    "MeshLayout",
    "MeshPhases",
    "MultiPathClassifier",
    "OpticalElement",
    "OutputEffect",
    "PhaseCalibration",
    "PhaseController",
    "PhaseEffect",
    "PhaseError",
    "PhaseQuantization",
    "PhaseScreen",
    "PhaseShifter",
    "PhotonicClassifier",
    "PhotonicCore",
    "PhotonicCost",
    "Prediction",
    "Readout",
    "Reconfiguration",
    "ShifterGainError",
    "SplitterImbalance",
    "TaichiUnit",
    "ThermalCrosstalk",
    "TiledEngine",
    "TiledProgram",
    "UnitPhases",
    "check_forward_only",
    "clements_decompose",
    "clements_reconstruct",
    "ffm_backward",
    "ffm_forward",
    "load_preset",
    "mesh_elements",
    "predictions",
    "propagate",
    "propagate_reverse",
    "svd_decompose",
    "svd_reconstruct",
    "tile_matrix",
    "tiled_apply",
    "tiled_reconstruct",
    "train_digital",
    "transfer_matrix",
    "unit_elements",
    "unit_gradients",
]
