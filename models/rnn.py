"""LSTM/GRU sequence classifier; an image is read one row per time step."""

from __future__ import annotations

import torch
from torch import nn


class RecurrentClassifier(nn.Module):
    def __init__(
        self, cell: str, input_size: int, hidden: int, layers: int, num_classes: int, dropout: float
    ) -> None:
        super().__init__()
        rnn_class = {"lstm": nn.LSTM, "gru": nn.GRU}[cell]
        self.rnn = rnn_class(
            input_size, hidden, num_layers=layers, batch_first=True,
            dropout=dropout if layers > 1 else 0.0,
        )
        self.head = nn.Linear(hidden, num_classes)
        self.input_size = input_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (N, C, H, W) -> (N, H, C*W); (N, F) -> (N, F, 1)
        if x.dim() == 4:
            x = x.permute(0, 2, 1, 3).flatten(2)
        elif x.dim() == 2:
            x = x.unsqueeze(-1)
        out, _ = self.rnn(x)
        return self.head(out[:, -1])
