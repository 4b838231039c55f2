"""Decode caches of ``ak.nn.Attention``: keys/values for softmax methods, a state for recurrent ones."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..errors import ArgumentError


@dataclass
class AttentionCache:
    """What one layer remembers between decode calls.

    ``key``/``value`` ``(B, Hkv, T, D)``: projected (and rotated) keys of every token seen so far,
    or of the cross-attention context. ``state``: the recurrent state of linear methods.
    ``position``: how many tokens of the layer's own sequence were processed.
    """

    key: torch.Tensor | None = None
    value: torch.Tensor | None = None
    state: Any = None
    position: int = 0

    def append(self, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.key is None:
            self.key, self.value = key, value
        else:
            self.key = torch.cat([self.key, key], dim=2)
            self.value = torch.cat([self.value, value], dim=2)
        return self.key, self.value


def cross_keys_values(layer, context: torch.Tensor | None, cache: AttentionCache | None):
    """Keys and values of a cross-attention ``layer`` (one with ``k_proj``, ``v_proj``, ``kv_heads``
    and ``_split``): projected from ``context``, or the cached ones when decoding passes no context;
    a cache given with a context keeps the new projections."""
    if cache is not None and cache.key is not None and context is None:
        return cache.key, cache.value
    if context is None:
        raise ArgumentError("a cross-attention layer needs context=(B, M, context_dim).")
    k = layer._split(layer.k_proj(context), layer.kv_heads)
    v = layer._split(layer.v_proj(context), layer.kv_heads)
    if cache is not None:
        cache.key, cache.value = k, v
    return k, v
