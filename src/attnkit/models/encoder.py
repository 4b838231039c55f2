"""A small encoder classifier with a ``method=`` switch (ListOps-style tasks)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .blocks import Block


class EncoderClassifier(nn.Module):
    """Embedding (+ learned positions), ``depth`` noncausal blocks, mean pooling, linear head.
    ``forward(tokens (B, L), pad_mask (B, L) bool | None) -> logits (B, classes)``."""

    def __init__(self, vocab: int, classes: int, dim: int = 64, depth: int = 2, heads: int = 4, *,
                 max_len: int = 2048, method: str = "dense", **options: Any):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.randn(max_len, dim) * 0.02)
        self.blocks = nn.ModuleList(Block(dim, heads, causal=False, method=method, rope=False, **options)
                                    for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, tokens: torch.Tensor, pad_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.embed(tokens) + self.pos[: tokens.shape[1]]
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        if pad_mask is None:
            return self.head(x.mean(1))
        w = pad_mask.to(x.dtype)[..., None]
        return self.head((x * w).sum(1) / w.sum(1).clamp_min(1))
