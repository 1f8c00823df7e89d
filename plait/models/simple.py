"""The seeds' models: the CNN classifier and linear regression; and a plain MLP."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class DigitsCNN(nn.Module):
    """The first seed's CNN: conv 1->10 k5, pool, conv 10->20 k5, pool, fc 320->50, fc 50->10.

    Takes [N, 1, 28, 28] images; returns log-probabilities [N, 10], as in the seed.
    """

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 10, kernel_size=5)
        self.conv2 = nn.Conv2d(10, 20, kernel_size=5)
        self.fc1 = nn.Linear(320, 50)
        self.fc2 = nn.Linear(50, num_classes)

    def pipeline_blocks(self) -> list[tuple[str, nn.Module]]:
        """The same computation as consecutive blocks, for cutting into pipeline stages."""
        return [
            ("conv1", nn.Sequential(self.conv1, nn.MaxPool2d(2), nn.ReLU())),  # [N, 10, 12, 12]
            ("conv2", nn.Sequential(self.conv2, nn.MaxPool2d(2), nn.ReLU(), nn.Flatten())),  # [N, 320]
            ("fc1", nn.Sequential(self.fc1, nn.ReLU())),  # [N, 50]
            ("fc2", nn.Sequential(self.fc2, nn.LogSoftmax(dim=1))),  # [N, classes]
        ]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(F.max_pool2d(self.conv1(x), 2))  # [N, 10, 12, 12]
        x = F.relu(F.max_pool2d(self.conv2(x), 2))  # [N, 20, 4, 4]
        x = F.relu(self.fc1(x.flatten(1)))  # [N, 50]
        return F.log_softmax(self.fc2(x), dim=1)  # [N, classes]


class LinearRegression(nn.Module):
    """The second seed's model: h(x) = x w + b, trained with an MSE loss."""

    def __init__(self, in_features: int):
        super().__init__()
        self.linear = nn.Linear(in_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)  # [N, 1]


def mlp(in_features: int, num_classes: int, hidden: int = 256, depth: int = 2) -> nn.Sequential:
    """Flatten, then ``depth`` hidden layers of width ``hidden`` with ReLU, then a classifier."""
    if depth < 1 or hidden < 1:
        raise ValueError(f"depth and hidden must be positive, got {depth}, {hidden}")
    layers: list[nn.Module] = [nn.Flatten()]
    width = in_features
    for _ in range(depth):
        layers += [nn.Linear(width, hidden), nn.ReLU()]
        width = hidden
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)
