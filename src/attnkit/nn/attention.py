"""``ak.nn.Attention``: projections + ``ak.attend`` for any registered method.

    layer = ak.nn.Attention(256, 8, kv_heads=2, method="sliding_window", causal=True, rope=True, window=64)
    y = layer(x)                                   # x (B, L, dim)
    cache = layer.init_cache(batch=B)
    y_t = layer(x[:, t:t+1], cache=cache)          # one token at a time; equals y[:, t]

Softmax-family methods decode through a key/value cache (bottom-right causal alignment makes a
query at step t see exactly what row t saw in the full forward). Methods that keep their own
decode state — recurrent methods (``RecurrentMethod``), and caches that are not the plain growing
key/value cache, such as H2O's evicting cache — implement ``init_state`` / ``forward_state``
and decode through that state. Methods of kind ``layer`` own parameters and supply their own
module (``build_layer``), which this class wraps; so do functional methods whose options ask for
their trainable layer (``Method.owns_layer``, e.g. ``method="seer", learned=True``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..api import attend
from ..errors import ArgumentError, ShapeError
from ..registry import get_method
from .cache import AttentionCache, cross_keys_values
from .rope import apply_rope


class Attention(nn.Module):
    """Multi-head attention over ``x (B, L, dim)`` (self) or ``context (B, M, context_dim)`` (cross).

    ``heads`` query heads of ``head_dim`` (default ``dim // heads``); ``kv_heads`` for GQA/MQA;
    ``causal`` for autoregressive self-attention; ``cross`` to attend to a context (the whole
    context is visible to every query); ``rope`` for rotary positions (self-attention only);
    ``**options`` are the method's options, checked here, at construction.
    """

    def __init__(self, dim: int, heads: int, *, kv_heads: int | None = None, head_dim: int | None = None,
                 method: str = "dense", causal: bool = False, cross: bool = False, rope: bool = False,
                 rope_base: float = 10000.0, context_dim: int | None = None, bias: bool = False,
                 backend: str = "auto", **options: Any):
        super().__init__()
        kv_heads = heads if kv_heads is None else kv_heads
        if heads % kv_heads:
            raise ShapeError(f"heads={heads} must be a multiple of kv_heads={kv_heads}.")
        head_dim = head_dim or dim // heads
        if head_dim * heads == 0:
            raise ShapeError(f"dim={dim} with heads={heads} leaves no head dimension; pass head_dim.")
        if rope and cross:
            raise ArgumentError("rope=True with cross=True is not supported: rotary positions need "
                                "query and key positions on one axis.")
        if rope and options.get("token_order") == "tiled":
            raise ArgumentError("rope=True with token_order='tiled': the layer's rotary positions are the "
                                "sequence positions, which in the tiled order are not the grid's; use "
                                "token_order='call' with rope, or positions applied before the permutation.")
        if rope and head_dim % 2:
            raise ShapeError(f"rope needs an even head_dim, got {head_dim}.")
        if cross and causal:
            raise ArgumentError(
                "cross=True with causal=True: a cross-attention layer lets every query see the whole "
                "context (queries never mix, so it is already safe for autoregressive decoding).")
        self.impl = get_method(method)
        self.method, self.backend = method, backend
        self.options = self.impl.info.options.validate(options, method)
        self.dim, self.heads, self.kv_heads, self.head_dim = dim, heads, kv_heads, head_dim
        self.causal, self.cross, self.rope, self.rope_base = causal, cross, rope, rope_base
        self.user_options = dict(options)
        self.inner = None
        if self.impl.owns_layer(self.options):
            # layer settings other than the defaults go to the method's layer, never silently dropped
            settings = {name: value for name, value, default in (
                ("rope", rope, False), ("rope_base", rope_base, 10000.0), ("bias", bias, False),
                ("backend", backend, "auto")) if value != default}
            refused = sorted(set(settings) - self.impl.info.layer_settings)
            if refused:
                raise ArgumentError(
                    f"method {method!r} is a layer with its own projections and positions; it does not take "
                    f"{', '.join(f'{n}={settings[n]!r}' for n in refused)}. Leave "
                    f"{'it' if len(refused) == 1 else 'them'} at the default.")
            self.inner = self.impl.build_layer(dim=dim, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
                                               causal=causal, cross=cross, context_dim=context_dim,
                                               **settings, **self.user_options)
            return
        cdim = context_dim or dim
        self.q_proj = nn.Linear(dim, heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(cdim, kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(cdim, kv_heads * head_dim, bias=bias)
        self.o_proj = nn.Linear(heads * head_dim, dim, bias=bias)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, heads={self.heads}, kv_heads={self.kv_heads}, method={self.method!r}, "
                f"causal={self.causal}, cross={self.cross}, rope={self.rope}, options={self.user_options}")

    def _split(self, x: torch.Tensor, heads: int) -> torch.Tensor:
        B, L, _ = x.shape
        return x.view(B, L, heads, self.head_dim).transpose(1, 2)

    def _attend(self, q, k, v, causal: bool, attn_mask=None) -> torch.Tensor:
        return attend(q, k, v, attn_mask, is_causal=causal, enable_gqa=self.kv_heads != self.heads,
                      method=self.method, backend=self.backend, **self.user_options)

    def init_cache(self, batch: int | None = None) -> Any:
        """A fresh decode cache (``batch`` is informative; caches size themselves on first use)."""
        if self.inner is not None:
            return self.inner.init_cache(batch)
        if not self.cross and not self.causal:
            raise ArgumentError("a noncausal self-attention layer cannot decode token by token "
                                "(every query sees future tokens); build it with causal=True.")
        if not self.impl.info.decode:
            raise ArgumentError(f"method {self.method!r} does not support decoding (MethodInfo.decode is False).")
        return AttentionCache()

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, cache: AttentionCache | None = None,
                attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.inner is not None:
            return self.inner(x, context=context, cache=cache)
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ShapeError(f"x must be (B, L, dim={self.dim}), got {tuple(x.shape)}.")
        B, L, _ = x.shape
        q = self._split(self.q_proj(x), self.heads)
        if self.cross:
            out = self._cross(q, context, cache, attn_mask)
        elif cache is None:
            k = self._split(self.k_proj(x), self.kv_heads)
            v = self._split(self.v_proj(x), self.kv_heads)
            if self.rope:
                pos = torch.arange(L, device=x.device)
                q, k = apply_rope(q, pos, self.rope_base), apply_rope(k, pos, self.rope_base)
            out = self._attend(q, k, v, self.causal, attn_mask)
        else:
            out = self._step(x, q, cache, attn_mask)
        return self.o_proj(out.transpose(1, 2).reshape(B, L, self.heads * self.head_dim))

    def _cross(self, q, context, cache, attn_mask):
        k, v = cross_keys_values(self, context, cache)
        return self._attend(q, k, v, False, attn_mask)

    def _step(self, x, q, cache: AttentionCache, attn_mask):
        L = x.shape[1]
        k = self._split(self.k_proj(x), self.kv_heads)
        v = self._split(self.v_proj(x), self.kv_heads)
        if self.rope:
            pos = torch.arange(cache.position, cache.position + L, device=x.device)
            q, k = apply_rope(q, pos, self.rope_base), apply_rope(k, pos, self.rope_base)
        cache.position += L
        if callable(getattr(self.impl, "forward_state", None)):  # the method's own decode state
            if attn_mask is not None:
                raise ArgumentError(f"method {self.method!r} takes no attn_mask.")
            from ..call import AttentionCall

            call = AttentionCall.build(q, k, v, None, 0.0, True, None, self.kv_heads != self.heads)
            call = call.with_options(self.options)
            if cache.state is None:
                cache.state = self.impl.init_state(q.shape[0], self.heads, self.head_dim, self.head_dim,
                                                   dtype=q.dtype, device=q.device, options=self.options)
            out, cache.state = self.impl.forward_state(call, cache.state)
            return out
        k_all, v_all = cache.append(k, v)
        return self._attend(q, k_all, v_all, True, attn_mask)
