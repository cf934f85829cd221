"""Gradient flow: backward passes over the calibration data, per site and per parameter.

Gradients are taken with `torch.autograd.grad` (never `.backward()`), so no `.grad` is left
on the model's parameters and the weights never change. Each batch's graph is released
before the next one. Per-parameter norms are the root mean square over batches of the
batch gradient's norm (what an optimizer step sees), kept as (sum of squares, count) so
they merge across batches and processes.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, ClassVar, Iterator

import torch

from ...errors import UsageError
from ...measure.accumulators import Accumulators, State, TorchArrays

LOSSES = ("cross-entropy", "predicted-class", "half-squared-norm")
VANISHING_RATIO = 1e-3
EXPLODING_RATIO = 1e3


def choose_loss(requested: str | None, output: torch.Tensor, labels: torch.Tensor | None) -> str:
    """cross-entropy with labels; the predicted class for logits; else half the squared norm."""
    looks_like_logits = output.dim() == 2 and output.shape[1] > 1 and output.is_floating_point()
    if requested is not None:
        if requested not in LOSSES:
            raise UsageError(f"--loss {requested!r} is not one of {', '.join(LOSSES)}")
        if requested == "cross-entropy" and labels is None:
            raise UsageError("--loss cross-entropy needs labels in the data (y/labels)")
        if requested in ("cross-entropy", "predicted-class") and not looks_like_logits:
            raise UsageError(f"--loss {requested} needs class logits (batch, classes); the model outputs "
                             f"{tuple(output.shape)}")
        return requested
    if labels is not None and looks_like_logits and not labels.is_floating_point() and labels.dim() == 1:
        return "cross-entropy"
    if looks_like_logits:
        return "predicted-class"
    return "half-squared-norm"


def loss_value(name: str, output: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
    if name == "cross-entropy":
        assert labels is not None
        if labels.shape[0] != output.shape[0]:
            raise UsageError(f"{labels.shape[0]} labels for a batch of {output.shape[0]} outputs")
        return torch.nn.functional.cross_entropy(output.float(), labels.to(output.device).long())
    if name == "predicted-class":
        return torch.nn.functional.cross_entropy(output.float(), output.detach().argmax(dim=1))
    return 0.5 * output.float().pow(2).sum() / max(output.shape[0], 1)


def first_tensor(output: Any) -> torch.Tensor:
    """The tensor a loss is computed on: the output itself, or the first tensor of a tuple/dict."""
    if isinstance(output, torch.Tensor):
        return output
    values = output.values() if isinstance(output, dict) else output if isinstance(output, (tuple, list)) else ()
    for value in values:
        found = first_tensor(value) if not isinstance(value, torch.Tensor) else value
        if found is not None:
            return found
    raise UsageError(f"--gradients needs a model output tensor; the model returned {type(output).__name__}")


class ParameterGradients(Accumulators):
    """Per-parameter sums of squared batch-gradient norms, on the model's device."""

    STATES: ClassVar[tuple[State, ...]] = (
        State("sumsq", "float64", "sum", "units"),  # one "unit" per parameter tensor
        State("nonfinite", "int64", "sum"),  # non-finite gradient elements
        State("loss_sum", "float64", "sum"),
    )
    COUNTERS: ClassVar[tuple[str, ...]] = ("batches",)

    def __init__(self, named: list[tuple[str, torch.Tensor]], device: torch.device) -> None:
        self.names = [n for n, _ in named]
        self.tensors = [t for _, t in named]
        self.loss: str | None = None
        self._create_states(TorchArrays(device), len(self.names))

    @classmethod
    def of(cls, named: list[tuple[str, torch.Tensor]], device: torch.device) -> "ParameterGradients":
        return cls(named, device)

    def step(self, output: Any, labels: torch.Tensor | None, requested_loss: str | None) -> None:
        out = first_tensor(output)
        if self.loss is None:
            self.loss = choose_loss(requested_loss, out, labels)
        loss = loss_value(self.loss, out, labels)
        self.loss_sum += loss.detach().double().to(self.loss_sum.device)
        grads = torch.autograd.grad(loss, self.tensors, allow_unused=True)
        present = [g if g is not None else torch.zeros((), device=loss.device) for g in grads]
        norms = torch.stack([n.to(self.sumsq.device) for n in torch._foreach_norm(present)]).double()
        self.nonfinite += sum((~torch.isfinite(g)).sum() for g in present)  # elements, each counted once
        self.sumsq += norms.pow(2)
        self.batches += 1

    def to_dict(self, vanishing: float = VANISHING_RATIO, exploding: float = EXPLODING_RATIO) -> dict[str, Any]:
        grad_norms = [math.sqrt(v / self.batches) if self.batches else 0.0 for v in self.sumsq.cpu().tolist()]
        weight_norms = [float(n) for n in torch.stack(
            [torch.linalg.vector_norm(t.detach().float()) for t in self.tensors]).cpu().tolist()] if self.tensors else []
        parameters = []
        for name, tensor, grad_norm, weight_norm in zip(self.names, self.tensors, grad_norms, weight_norms):
            parameters.append({
                "name": name,
                "shape": list(tensor.shape),
                "grad_norm": grad_norm if math.isfinite(grad_norm) else None,
                "weight_norm": weight_norm,
                "ratio": grad_norm / weight_norm if weight_norm and math.isfinite(grad_norm) else None,
            })
        weighted = [p for p, t in zip(parameters, self.tensors) if t.dim() >= 2 and p["grad_norm"] is not None]
        first, last = (weighted[0], weighted[-1]) if weighted else (None, None)
        slope = None
        if first is not None and last is not None and last["grad_norm"]:
            slope = first["grad_norm"] / last["grad_norm"]
        verdict = "ok"
        if slope is not None and slope < vanishing:
            verdict = "vanishing"
        elif slope is not None and slope > exploding:
            verdict = "exploding"
        loss_mean = float(self.loss_sum.item()) / self.batches if self.batches else None
        return {
            "loss": self.loss,
            "loss_mean": loss_mean if loss_mean is not None and math.isfinite(loss_mean) else None,
            "batches": self.batches,
            "verdict": verdict,
            "first_layer": first["name"] if first else None,
            "last_layer": last["name"] if last else None,
            "first_to_last_ratio": slope,
            "thresholds": {"vanishing": vanishing, "exploding": exploding},
            "nonfinite": int(self.nonfinite.item()),
            "parameters": parameters,
        }


@contextlib.contextmanager
def trainable(named: list[tuple[str, torch.Tensor]]) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Floating-point parameters require grad for the analysis; the flags are restored afterwards."""
    flags = [(t, t.requires_grad) for _, t in named]
    floating = [(n, t) for n, t in named if t.is_floating_point()]
    try:
        for _, t in floating:
            t.requires_grad_(True)
        yield floating
    finally:
        for t, flag in flags:
            t.requires_grad_(flag)

