"""A small convolutional network for (C, H, W) images of any size."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class SmallCNN(nn.Module):
    """conv-bn-relu blocks (the first keeps resolution, the rest halve it), global pooling, linear head."""

    def __init__(self, in_channels: int, channels: Sequence[int], num_classes: int, dropout: float) -> None:
        super().__init__()
        blocks: list[nn.Module] = []
        width = in_channels
        for index, out in enumerate(channels):
            blocks += [
                nn.Conv2d(width, out, kernel_size=3, padding=1, bias=False),
                nn.BatchNorm2d(out),
                nn.ReLU(inplace=True),
            ]
            if index < len(channels) - 1:
                blocks.append(nn.MaxPool2d(2))
            width = out
        self.features = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(dropout), nn.Linear(width, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.features(x)))
