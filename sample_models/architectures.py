"""Small reference networks for the scikit-learn digits data set (1x8x8 inputs).

Plain torch only, so any tool can rebuild a model from a state_dict. Attribute
names are chosen to give readable ReLU site names (``act1``, ``relu``, ...).
"""

import torch
import torch.nn.functional as F
from torch import nn


class DigitsMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(64, 128)
        self.act1 = nn.ReLU()
        self.fc2 = nn.Linear(128, 64)
        self.act2 = nn.ReLU()
        self.head = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.fc1(self.flatten(x)))
        x = self.act2(self.fc2(x))
        return self.head(x)


class DigitsCNN(nn.Module):
    """Exercises the awkward cases: BatchNorm before a ReLU, a functional
    ``F.relu`` with no module of its own, and one ``nn.ReLU`` module that is
    called twice per forward pass."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(32 * 4 * 4, 64)
        self.head = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.conv2(x))
        x = self.flatten(self.pool(x))
        x = self.relu(self.fc1(x))  # same module as above, second call site
        return self.head(x)


def digits_mlp() -> DigitsMLP:
    return DigitsMLP()


def digits_cnn() -> DigitsCNN:
    return DigitsCNN()
