"""In silico versus in situ: the core claim of physical training, on a small seeded case.

A classifier whose weight matrices run on MZI units (biases and ReLU are
digital) is

1. trained by backprop on the digital twin (the ideal model: exactly W),
2. deployed on a physical device with hidden fabrication errors, where it
   loses accuracy, and
3. trained in situ by fully forward mode: phase gradients measured on the
   physical device itself (``ffm.py``), digital parts by their exact gradients.

Each layer reads the in-phase quadrature of its outputs (coherent detection)
and reports y = Re(W x) + b.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise
from typing import Any, NamedTuple

import torch
from torch import Tensor

from core.config import doc
from nodes.photonic.clements import UnitPhases, svd_decompose, unit_gradients
from nodes.photonic.device import PhotonicCore
from nodes.photonic.elements import OpticalElement
from nodes.photonic.ffm import ffm_backward, ffm_forward


class _LayerPass(NamedTuple):
    """What the forward pass of one layer keeps for its in-situ backward pass."""

    core: PhotonicCore
    elements: list[OpticalElement]
    stored: list[Any]
    scale: Tensor
    z: Tensor


class PhotonicClassifier:
    """An MLP with one photonic core per weight matrix; biases and ReLU in digital logic."""

    def __init__(self, cores: list[PhotonicCore], biases: list[Tensor]) -> None:
        self.cores = cores
        self.biases = [b.detach().to(torch.float64).clone() for b in biases]

    @staticmethod
    def deploy(
        weights: list[Tensor], biases: list[Tensor], device: PhotonicCore.Config, seed: int
    ) -> PhotonicClassifier:
        """Program trained weights on fresh cores (core l draws its errors from seed + l)."""
        cores = []
        for index, w in enumerate(weights):
            core = device.build(seed + 1000 * index)
            core.program(svd_decompose(w.detach().to(torch.float64), device.mesh_size))
            cores.append(core)
        return PhotonicClassifier(cores, biases)

    def _layer(self, index: int, h: Tensor) -> Tensor:
        return self.cores[index].matmul(h).real + self.biases[index]

    def logits(self, x: Tensor) -> Tensor:
        h = x.to(torch.float64)
        for index in range(len(self.cores)):
            h = self._layer(index, h)
            if index < len(self.cores) - 1:
                h = torch.relu(h)
        return h

    def accuracy(self, x: Tensor, y: Tensor) -> float:
        with torch.no_grad():
            return (self.logits(x).argmax(dim=-1) == y).double().mean().item()

    def ffm_step(self, x: Tensor, y: Tensor) -> tuple[float, list[UnitPhases], list[Tensor]]:
        """Loss and in-situ gradients: phases (w.r.t. the phases the light sees) and biases.

        Every optical pass (forward and the conjugated-error pass) runs on the
        physical cores; only the softmax, ReLU derivative and input scaling are digital.
        """
        h = x.to(torch.float64)
        passes: list[_LayerPass] = []
        for index, core in enumerate(self.cores):
            field, scale = core.encode(h)
            elements = core.elements()
            out_field, stored = ffm_forward(elements, field)
            z = core.read(out_field, scale).real + self.biases[index]
            passes.append(_LayerPass(core, elements, stored, scale, z))
            h = torch.relu(z) if index < len(self.cores) - 1 else z
        loss = torch.nn.functional.cross_entropy(h, y)
        grad_z = (torch.softmax(h, dim=-1) - torch.nn.functional.one_hot(y, h.shape[-1])) / len(y)
        phase_grads: list[UnitPhases] = []
        bias_grads: list[Tensor] = []
        for index in range(len(self.cores) - 1, -1, -1):
            layer = passes[index]
            bias_grads.insert(0, grad_z.sum(dim=0))
            # y = Re(E) * s, so dL/dE* = s dL/dy / 2 on the read modes.
            padded = torch.nn.functional.pad(grad_z, (0, layer.core.num_modes - grad_z.shape[-1]))
            error = (0.5 * layer.core.output_scale(layer.scale) * padded).to(torch.complex128)
            input_error, grads = ffm_backward(layer.elements, layer.stored, error)
            phase_grads.insert(0, unit_gradients(layer.core.commanded, grads))
            if index > 0:
                # The input field is h / scale (real), so dL/dh = 2 Re(dL/dE_in*) / scale.
                grad_h = 2.0 * input_error.real[..., : layer.core.num_inputs] / layer.scale
                grad_z = grad_h * (passes[index - 1].z > 0)
        return loss.item(), phase_grads, bias_grads

    def train_ffm(self, x: Tensor, y: Tensor, num_steps: int, lr: float) -> list[float]:
        """In-situ training of every phase and bias with Adam on FFM gradients; returns losses."""
        params = [t.requires_grad_() for core in self.cores for t in core.commanded.tensors()]
        params += [b.requires_grad_() for b in self.biases]
        optimizer = torch.optim.Adam(params, lr=lr)
        losses = []
        for _ in range(num_steps):
            with torch.no_grad():
                loss, phase_grads, bias_grads = self.ffm_step(x, y)
            grads = [g for pg in phase_grads for g in pg.tensors()] + bias_grads
            for param, grad in zip(params, grads, strict=True):
                param.grad = grad.detach()
            optimizer.step()
            losses.append(loss)
        for param in params:
            param.requires_grad_(False)
            param.grad = None
        return losses


def train_digital(
    x: Tensor, y: Tensor, widths: list[int], num_steps: int, lr: float, seed: int
) -> tuple[list[Tensor], list[Tensor]]:
    """Backprop on the twin: an ideal twin computes exactly W x, so this is plain torch (float64)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        layers = [torch.nn.Linear(a, b, dtype=torch.float64) for a, b in pairwise(widths)]
    model = torch.nn.Sequential(*[m for layer in layers for m in (layer, torch.nn.ReLU())][:-1])
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(num_steps):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x.to(torch.float64)), y).backward()
        optimizer.step()
    return [layer.weight.detach() for layer in layers], [layer.bias.detach() for layer in layers]


@dataclass
class InsituResult:
    twin_accuracy: float
    deployed_accuracy: float
    ffm_accuracy: float
    ffm_losses: list[float]


class InsituExperiment:
    """Twin-trained versus in-situ-trained accuracy on one seeded physical device."""

    @dataclass(kw_only=True)
    class Config:
        hidden_width: int = doc("neurons of the hidden layer, count", default=16)
        digital_steps: int = doc("backprop steps on the twin, count", default=400)
        digital_lr: float = doc("Adam learning rate on the twin, 1", default=0.02)
        ffm_steps: int = doc("in-situ FFM steps on the physical device, count", default=150)
        ffm_lr: float = doc("Adam learning rate of in-situ training, rad per step", default=0.01)
        seed: int = doc("seed of initialization and of the device's fabrication errors", default=0)
        device: PhotonicCore.Config = doc(
            "the physical device", default_factory=PhotonicCore.Config
        )

        def __post_init__(self) -> None:
            for name in ("hidden_width", "digital_steps", "ffm_steps"):
                if getattr(self, name) < 1:
                    raise ValueError(
                        f"{name} = {getattr(self, name)} is not valid; it must be >= 1."
                    )
            for name in ("digital_lr", "ffm_lr"):
                if not getattr(self, name) > 0:
                    raise ValueError(
                        f"{name} = {getattr(self, name)} is not valid; it must be > 0."
                    )

        def build(self) -> InsituExperiment:
            return InsituExperiment(self)

    def __init__(self, config: Config) -> None:
        self.config = config

    def run(self, train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor) -> InsituResult:
        c = self.config
        num_classes = int(max(train_y.max(), test_y.max())) + 1
        widths = [train_x.shape[-1], c.hidden_width, num_classes]
        if max(widths) > c.device.mesh_size:
            raise ValueError(
                f"device.mesh_size = {c.device.mesh_size} is too small for layer widths {widths}; "
                f"it must be >= {max(widths)}."
            )
        weights, biases = train_digital(
            train_x, train_y, widths, c.digital_steps, c.digital_lr, c.seed
        )
        twin = PhotonicClassifier.deploy(weights, biases, c.device.twin(), c.seed)
        physical = PhotonicClassifier.deploy(weights, biases, c.device, c.seed)
        twin_accuracy = twin.accuracy(test_x, test_y)
        deployed_accuracy = physical.accuracy(test_x, test_y)
        losses = physical.train_ffm(train_x, train_y, c.ffm_steps, c.ffm_lr)
        return InsituResult(
            twin_accuracy, deployed_accuracy, physical.accuracy(test_x, test_y), losses
        )
