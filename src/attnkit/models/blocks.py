"""A pre-norm transformer block with any attention method."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..nn import Attention
from ..registry import get_method


def takes_rope(method: str, **options) -> bool:
    """Rotary positions apply to methods on ak.nn.Attention's projections; methods that build their
    own layer (kind ``layer``, or ``owns_layer`` for these options, e.g. ``learned=True``) with their
    own position handling take them only if they declare it in ``MethodInfo.layer_settings``."""
    impl = get_method(method)
    if not impl.owns_layer(impl.info.options.validate(options, method)):
        return True
    return "rope" in impl.info.layer_settings


class MLP(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.up = nn.Linear(dim, mult * dim)
        self.down = nn.Linear(mult * dim, dim)

    def forward(self, x):
        return self.down(torch.nn.functional.gelu(self.up(x)))


class Block(nn.Module):
    """``x + attn(norm(x))`` then ``x + mlp(norm(x))``. ``rope`` is used where the method takes
    rotary positions (see ``takes_rope``)."""

    def __init__(self, dim: int, heads: int, *, causal: bool, method: str, rope: bool = True,
                 kv_heads: int | None = None, mlp_mult: int = 4, **options: Any):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, kv_heads=kv_heads, method=method, causal=causal,
                              rope=rope and takes_rope(method, **options), **options)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, mlp_mult)

    def forward(self, x, cache=None):
        x = x + self.attn(self.norm1(x), cache=cache)
        return x + self.mlp(self.norm2(x))
