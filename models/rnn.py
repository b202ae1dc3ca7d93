"""LSTM/GRU sequence classifier: an image is read one row per time step; token ids go
through an embedding front end first."""

from __future__ import annotations

import torch
from torch import nn

from models.transformer import PAD_ID


class RecurrentClassifier(nn.Module):
    """Images ``(N, C, H, W)``, sequences ``(N, T, F)``, tabular ``(N, F)``, or - with
    ``vocab_size`` - token ids ``(N, L)`` (float32, id 0 padding at the end): token ids ->
    embedding -> recurrent -> head, read at each sequence's last real token."""

    def __init__(
        self, cell: str, input_size: int, hidden: int, layers: int, num_classes: int, dropout: float,
        vocab_size: int | None = None,
    ) -> None:
        super().__init__()
        rnn_class = {"lstm": nn.LSTM, "gru": nn.GRU}[cell]
        self.embedding = nn.Embedding(vocab_size, input_size, padding_idx=PAD_ID) if vocab_size else None
        self.rnn = rnn_class(
            input_size, hidden, num_layers=layers, batch_first=True,
            dropout=dropout if layers > 1 else 0.0,
        )
        self.head = nn.Linear(hidden, num_classes)
        self.input_size = input_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.embedding is not None:
            ids = x.long()
            out, _ = self.rnn(self.embedding(ids))
            # The output at the last real token (padding follows it): lengths - 1, at least 0.
            last = ((ids != PAD_ID).sum(dim=1) - 1).clamp(min=0)
            return self.head(out[torch.arange(out.shape[0], device=out.device), last])
        # (N, C, H, W) -> (N, H, C*W); (N, F) -> (N, F, 1)
        if x.dim() == 4:
            x = x.permute(0, 2, 1, 3).flatten(2)
        elif x.dim() == 2:
            x = x.unsqueeze(-1)
        out, _ = self.rnn(x)
        return self.head(out[:, -1])
