"""A small causal language model with a ``method=`` switch (benchmark tasks, examples)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .blocks import Block


class CausalLM(nn.Module):
    """Token embedding, ``depth`` causal blocks, tied output head. ``forward(tokens (B, L)) ->
    logits (B, L, vocab)``; ``step(tokens (B, l), caches)`` continues from decode caches."""

    def __init__(self, vocab: int, dim: int = 64, depth: int = 2, heads: int = 4, *, method: str = "dense",
                 rope: bool = True, kv_heads: int | None = None, **options: Any):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(Block(dim, heads, causal=True, method=method, rope=rope,
                                          kv_heads=kv_heads, **options) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.method = method

    def forward(self, tokens: torch.Tensor, caches: list | None = None) -> torch.Tensor:
        x = self.embed(tokens)
        for i, block in enumerate(self.blocks):
            x = block(x, cache=None if caches is None else caches[i])
        return self.norm(x) @ self.embed.weight.T

    def init_caches(self, batch: int) -> list:
        return [b.attn.init_cache(batch) for b in self.blocks]

    @torch.no_grad()
    def generate(self, prompt: torch.Tensor, steps: int) -> torch.Tensor:
        """Greedy decoding through the caches."""
        caches = self.init_caches(prompt.shape[0])
        logits = self(prompt, caches)
        out = [prompt]
        for _ in range(steps):
            nxt = logits[:, -1:].argmax(-1)
            out.append(nxt)
            logits = self(nxt, caches)
        return torch.cat(out, dim=1)
