"""DMA's trainable part: the layer that owns ``A`` and ``dt_proj``, and a small distillation utility.

``ak.nn.Attention(dim, heads, method="dma", learned=True, causal=True, rope=True, window=...)``
builds :class:`DMALayer`: projections, ``A`` (per kv head, zeros as in the official Doge layer) and
``dt_proj = Linear(Hkv * head_dim -> Hkv)`` (bias as the layer's ``bias`` setting, as Doge's
``attention_bias``), and ``ak.attend(method="dma", A=..., dt_weight=..., dt_bias=...)`` — so the
forward is exactly the functional form with these tensors, and the task loss trains them through
the additive bias (the top-window selection itself has no gradient). Decoding keeps the rotated
keys and the values of every token (the bias of a key needs only its value; a query's window is
chosen among all keys before it), so stepping equals the forward.

:func:`train_bias` is a toy training loop: it fits the layer's sparse output to the dense
attention output of the same (frozen) projections, training only ``A`` and ``dt_proj`` — the bias
learns which keys to keep and how to re-weight them. It demonstrates that the parameters learn
through the bias; it is not the paper's recipe (the paper pre-trains whole models with DMA).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ...errors import ArgumentError
from ...nn.cache import AttentionCache
from ...nn.rope import apply_rope
from ._training import learned_layer, train_only


class DMALayer(nn.Module):
    """Dynamic Mask Attention on ``x (B, L, dim)`` (``context`` for cross-attention)."""

    def __init__(self, impl, *, dim, heads, kv_heads, head_dim, causal, cross, context_dim, rope=False,
                 rope_base=10000.0, bias=False, backend="auto", **options: Any):
        super().__init__()
        opts = impl.info.options.validate(options, "dma")
        for name in ("A", "dt_weight", "dt_bias"):
            if opts[name] is not None:
                raise ArgumentError(f"the learned dma layer owns {name}; do not pass {name}=.")
        self.causal, self.cross, self.backend = causal, cross, backend
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.rope_base = rope_base if rope else None
        self.budget = {k: opts[k] for k in ("window", "density", "smooth_block", "block_size")}
        cdim = context_dim or dim
        self.q_proj = nn.Linear(dim, heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(cdim, kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(cdim, kv_heads * head_dim, bias=bias)
        self.o_proj = nn.Linear(heads * head_dim, dim, bias=bias)
        self.A = nn.Parameter(torch.zeros(kv_heads))
        self.dt_proj = nn.Linear(kv_heads * head_dim, kv_heads, bias=bias)

    def _heads(self, x, n):
        return x.view(x.shape[0], x.shape[1], n, self.head_dim).transpose(1, 2)

    def init_cache(self, batch=None):
        if not (self.causal or self.cross):
            raise ArgumentError("a noncausal dma layer cannot decode token by token; build it with causal=True.")
        return AttentionCache()

    def attend(self, q, k, v, causal: bool, method: str = "dma") -> torch.Tensor:
        from ...api import attend

        extra = {} if method == "dense" else dict(A=self.A, dt_weight=self.dt_proj.weight, dt_bias=self.dt_proj.bias,
                                                  **self.budget)
        return attend(q, k, v, is_causal=causal, enable_gqa=self.heads != self.kv_heads, method=method,
                      backend=self.backend if method != "dense" else "auto", **extra)

    def qkv(self, x, context=None, cache: AttentionCache | None = None):
        """Rotated ``q``, and the keys / values the queries attend (the cache's, when stepping)."""
        q = self._heads(self.q_proj(x), self.heads)
        if self.cross:
            if cache is not None and cache.key is not None and context is None:
                return q, cache.key, cache.value
            if context is None:
                raise ArgumentError("a cross-attention dma layer needs context=(B, M, context_dim).")
            k, v = self._heads(self.k_proj(context), self.kv_heads), self._heads(self.v_proj(context), self.kv_heads)
            if cache is not None:
                cache.key, cache.value = k, v
            return q, k, v
        k, v = self._heads(self.k_proj(x), self.kv_heads), self._heads(self.v_proj(x), self.kv_heads)
        start = 0 if cache is None else cache.position
        if self.rope_base is not None:
            pos = torch.arange(start, start + x.shape[1], device=x.device)
            q, k = apply_rope(q, pos, self.rope_base), apply_rope(k, pos, self.rope_base)
        if cache is not None:
            cache.position += x.shape[1]
            k, v = cache.append(k, v)
        return q, k, v

    def forward(self, x, context=None, cache=None, method: str = "dma"):
        B, L, _ = x.shape
        q, k, v = self.qkv(x, context, cache)
        out = self.attend(q, k, v, self.causal and not self.cross, method)
        return self.o_proj(out.transpose(1, 2).reshape(B, L, -1))


def dma_layer(layer) -> DMALayer:
    """The DMALayer inside ``layer`` (an ``ak.nn.Attention(..., method="dma", learned=True)``)."""
    return learned_layer(layer, DMALayer, "dma")


def train_bias(layer, data, steps: int = 100, lr: float = 1e-2) -> list[float]:
    """Fit the layer's sparse output to the dense attention output of its own projections for
    ``steps`` Adam steps on ``data`` (a ``x (B, L, dim)`` tensor or an iterable of them, cycled);
    only ``A`` and ``dt_proj`` train. Returns the mean squared error of each step."""
    inner = dma_layer(layer)
    params = [inner.A, *inner.dt_proj.parameters()]

    def loss_of(x):
        with torch.no_grad():
            target = inner(x, method="dense")
        return torch.nn.functional.mse_loss(inner(x), target)

    return train_only(inner, params, data, steps, torch.optim.Adam(params, lr=lr), loss_of)


__all__ = ["DMALayer", "train_bias"]
