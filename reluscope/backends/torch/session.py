"""What every torch capture offers the backend beyond the Session contract."""

from __future__ import annotations

import torch
from torch import nn

from ...measure.recorder import SiteRecorder
from ..base import Session
from .inputs import expectation


class TorchSession(Session):
    """A torch model with its sites captured: the parameters gradients flow to, and input hints."""

    def __init__(self, model: nn.Module, recorder: SiteRecorder) -> None:
        self.model = model
        self.recorder = recorder
        self.unanalysed: list[dict[str, str]] = []  # sites seen but not measured, with the reason

    def named_parameters(self) -> list[tuple[str, torch.Tensor]]:
        """The tensors the forward pass reads, under the model's parameter names."""
        return list(self.model.named_parameters())

    def input_hint(self, shapes: list[tuple[int, ...]]) -> str | None:
        return expectation(self.model, shapes)
