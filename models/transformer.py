"""A small transformer encoder classifier for token ids (text) and images (ViT-style patches).

Token ids arrive as a float32 tensor ``(N, L)`` (the prepared-data contract keeps every
input float32; ids are exact in float32 up to 2**24): they are cast to int64, embedded,
and id 0 (padding) is masked out of attention and pooling. Images ``(N, C, H, W)`` are
cut into ``patch_size`` x ``patch_size`` patches by a strided convolution (ViT). Either way
a learned positional embedding is added, ``layers`` pre-norm encoder layers follow, and
the masked mean of the last layer feeds a linear head.

Attention is written with separate query / key / value projections (not
``nn.MultiheadAttention``) so structured pruning can remove whole heads and FFN units
and plain ``nn.Linear`` layers are what int8 quantizers act on.
"""

from __future__ import annotations

import math

import torch
from torch import nn

PAD_ID = 0  # the padding id of every slimflow tokenizer (tasks.sources.text)


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int, head_dim: int, dropout: float) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        inner = heads * head_dim
        self.query = nn.Linear(dim, inner)
        self.key = nn.Linear(dim, inner)
        self.value = nn.Linear(dim, inner)
        self.out = nn.Linear(inner, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        n, length, _ = x.shape

        def split(t: torch.Tensor) -> torch.Tensor:  # (N, L, h*d) -> (N, h, L, d)
            return t.reshape(n, length, self.heads, self.head_dim).transpose(1, 2)

        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        scores = q @ k.transpose(-2, -1) / math.sqrt(self.head_dim)
        if keep is not None:  # padding keys get no attention (a finite minimum: no NaN)
            scores = scores.masked_fill(~keep[:, None, None, :], torch.finfo(scores.dtype).min)
        weights = self.dropout(scores.softmax(dim=-1))
        return self.out((weights @ v).transpose(1, 2).reshape(n, length, self.heads * self.head_dim))


class EncoderLayer(nn.Module):
    """Pre-norm: x + attention(norm(x)), then x + FFN(norm(x))."""

    def __init__(self, dim: int, heads: int, head_dim: int, ffn_dim: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attention = SelfAttention(dim, heads, head_dim, dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(ffn_dim, dim))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        x = x + self.dropout(self.attention(self.norm1(x), keep))
        return x + self.dropout(self.ffn(self.norm2(x)))


class TransformerClassifier(nn.Module):
    """Token ids ``(N, L)`` (``vocab_size`` given) or images ``(N, C, H, W)`` (``patch_size``) -> logits."""

    def __init__(
        self, *, positions: int, dim: int, heads: int, head_dim: int, ffn_dim: int, layers: int, num_classes: int,
        dropout: float, vocab_size: int | None = None, in_channels: int = 1, patch_size: int = 2,
    ) -> None:
        super().__init__()
        self.tokens = vocab_size is not None
        if self.tokens:
            self.embed = nn.Embedding(vocab_size, dim, padding_idx=PAD_ID)
        else:
            self.embed = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size)
        self.position = nn.Parameter(torch.zeros(1, positions, dim))
        nn.init.trunc_normal_(self.position, std=0.02)
        self.dropout = nn.Dropout(dropout)
        self.layers = nn.ModuleList(EncoderLayer(dim, heads, head_dim, ffn_dim, dropout) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tokens:
            ids = x.long()
            keep: torch.Tensor | None = ids != PAD_ID
            h = self.embed(ids)
        else:
            keep = None
            h = self.embed(x).flatten(2).transpose(1, 2)  # (N, D, H/p, W/p) -> (N, patches, D)
        h = self.dropout(h + self.position)
        for layer in self.layers:
            h = layer(h, keep)
        h = self.norm(h)
        if keep is None:
            pooled = h.mean(dim=1)
        else:  # the mean over real tokens (every text has at least one)
            weights = keep.unsqueeze(-1).to(h.dtype)
            pooled = (h * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)
        return self.head(pooled)
