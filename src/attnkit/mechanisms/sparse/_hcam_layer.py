"""HCAM's official module as an ``ak.nn`` layer: ``ak.nn.Attention(dim, heads, method="hcam",
learned=True, cross=True, chunk_size=C, top_k=k)`` (or ``causal=True`` over the layer's own past).

With queries ``x (B, Q, E)`` and a memory of ``M`` chunks of ``C`` tokens (``context (B, M*C, E_c)``
cut into consecutive chunks; causal self-attention: the complete chunks of ``x`` that end at or
before the query)::

    keys         key_c = mean of chunk c's tokens                       (stop-gradient)
    relevance    r[i, c] = (W_q x_i) · (W_k key_c) / sqrt(F)            bias-free maps to F = H * hd
    kept         the top_k chunks by r among the visible ones; w = softmax of their r
    contents     chunk tokens + sinusoidal encodings of the C slots     (stop-gradient)
    inner        o[i, c] = MHA(query = x_i, key = value = contents_c)  H heads of hd, biased maps,
                                                                         output map to dim
    out[i]       = Σ_c w[i, c] o[i, c]

Confirmed in google-deepmind/deepmind-research @ f5de0ed ``hierarchical_transformer_memory/
hierarchical_attention/htm_attention.py``: ``_singlehead_linear`` without bias for the query and key
maps (VarianceScaling(2.0) init), ``stop_gradient`` on the keys and the contents, logits over
``sqrt(feature_size)``, masked logits -1e6, ``jax.lax.top_k`` then ``softmax``, Haiku
``MultiHeadAttention(key_size=feature_size // num_heads, model_size=feature_size)`` per selected
chunk (its maps carry biases), ``sinusoid_position_encoding`` (timescales 2 ... 1e4, positions
``C-1 ... 0``, ``[sin, cos]``) added to the contents; the test file's memory keys are chunk means.
Differences: weights start with PyTorch's defaults (Haiku: VarianceScaling 2.0); the output map
goes to ``dim`` (official: ``feature_size``, equal to the embedding size in its tests); a query
with no visible chunk gives 0 (officially top-k would pick masked memories at -1e6 with uniform
weights); ``top_k`` larger than the number of chunks keeps them all (``lax.top_k`` would fail).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ...errors import ArgumentError, ShapeError
from ...nn.cache import AttentionCache
from ._two_level import combine, group_attention, top_groups
from .hcam import DEFAULT_TOP_K

MAX_TIMESCALE = 1e4


def sinusoid_position_encoding(length: int, dim: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """``(length, dim)``: ``[sin(p / 1e4^(f/dim)), cos(...)]`` for ``f = 0, 2, 4, ...`` and positions
    ``p = length-1, ..., 0`` (the official layout); ``dim`` must be even."""
    freqs = torch.arange(0, dim, 2, dtype=torch.float64, device=device)
    inv = MAX_TIMESCALE ** (-freqs / dim)
    pos = torch.arange(length - 1, -1, -1, dtype=torch.float64, device=device)
    ang = pos[:, None] * inv[None]
    return torch.cat([ang.sin(), ang.cos()], -1).to(dtype)


class HCAMLayer(nn.Module):
    """HierarchicalMemoryAttention over a chunked memory (``context``) or the layer's own past."""

    def __init__(self, impl, *, dim, heads, kv_heads, head_dim, causal, cross, context_dim, **options: Any):
        super().__init__()
        opts = impl.info.options.validate(options, "hcam")
        if kv_heads != heads:
            raise ArgumentError(f"the learned hcam layer has no grouped-query attention (kv_heads={kv_heads} != "
                                f"heads={heads}); leave kv_heads unset.")
        if opts["density"] is not None:
            raise ArgumentError("the learned hcam layer keeps top_k chunks; pass top_k=, not density=.")
        self.causal, self.cross = causal, cross
        self.heads, self.head_dim, self.chunk = heads, head_dim, opts["chunk_size"]
        self.top_k = opts["top_k"] or DEFAULT_TOP_K
        self.position_encoding = True if opts["position_encoding"] is None else opts["position_encoding"]
        mdim = context_dim or dim
        if self.position_encoding and mdim % 2:
            raise ShapeError(f"hcam's memory position encodings need an even memory dimension, got {mdim}; "
                             "pass position_encoding=False.")
        self.features = heads * head_dim
        self.query_map = nn.Linear(dim, self.features, bias=False)
        self.key_map = nn.Linear(mdim, self.features, bias=False)
        self.q_proj = nn.Linear(dim, heads * head_dim)
        self.k_proj = nn.Linear(mdim, heads * head_dim)
        self.v_proj = nn.Linear(mdim, heads * head_dim)
        self.o_proj = nn.Linear(heads * head_dim, dim)

    def init_cache(self, batch=None):
        if not (self.causal or self.cross):
            raise ArgumentError("a noncausal hcam layer cannot decode token by token; build it with causal=True.")
        return AttentionCache()

    def _heads(self, x):
        return x.view(x.shape[0], x.shape[1], self.heads, self.head_dim).transpose(1, 2)

    def memory_output(self, x, memory, q_pos: torch.Tensor | None) -> torch.Tensor:
        """Attention of ``x (B, Q, dim)`` over ``memory (B, T, E)``: chunks ``[cC, (c+1)C)``;
        ``q_pos (Q,)``: each query's position in the memory (causal: only chunks ending at or before
        it), None: every complete chunk."""
        B, T, E = memory.shape
        C = self.chunk
        n = T // C
        if n == 0:
            return torch.zeros(B, x.shape[1], self.o_proj.out_features, dtype=x.dtype, device=x.device)
        mem = memory.detach()[:, :n * C]
        chunks = mem.view(B, n, C, E)
        contents = chunks + sinusoid_position_encoding(C, E, x.device, x.dtype) if self.position_encoding else chunks
        r = (self.query_map(x) @ self.key_map(chunks.mean(2)).transpose(-1, -2)) * self.features ** -0.5  # (B, Q, n)
        if q_pos is None:
            visible = torch.ones(x.shape[1], n, dtype=torch.bool, device=x.device)
        else:
            visible = (torch.arange(n, device=x.device) + 1) * C - 1 <= q_pos[:, None]
        keep = visible.sum(-1).clamp(max=self.top_k)
        groups = top_groups(r.detach(), visible, keep)  # (B, Q, K)
        outer = torch.where(groups >= 0, r.gather(-1, groups.clamp(min=0)), float("-inf"))
        q = self._heads(self.q_proj(x))
        k = self._heads(self.k_proj(contents.view(B, n * C, E)))
        v = self._heads(self.v_proj(contents.view(B, n * C, E)))
        groups_h = groups[:, None].expand(-1, self.heads, -1, -1)
        o, _ = group_attention(q, k, v, groups_h, torch.zeros(x.shape[1], dtype=torch.long, device=x.device), C,
                               self.head_dim ** -0.5, causal=False, skip_last=False)
        out = combine(o, outer[:, None].expand(-1, self.heads, -1, -1).to(o.dtype)).to(x.dtype)
        out = self.o_proj(out.transpose(1, 2).reshape(B, x.shape[1], -1))
        return out * (keep > 0)[..., None].to(out.dtype)

    def forward(self, x, context=None, cache=None):
        if self.cross:
            if cache is not None and context is None and cache.state is not None:
                context = cache.state
            if context is None:
                raise ArgumentError("a cross-attention hcam layer needs context=(B, M*chunk_size, context_dim).")
            if context.shape[1] % self.chunk:
                raise ShapeError(f"hcam's memory is whole chunks: context length {context.shape[1]} is not a multiple "
                                 f"of chunk_size={self.chunk}; pad or trim the context.")
            if cache is not None:
                cache.state = context
            return self.memory_output(x, context, None)
        start = 0
        if cache is not None:
            start = cache.position
            cache.state = x if cache.state is None else torch.cat([cache.state, x], 1)
            cache.position += x.shape[1]
            memory = cache.state
        else:
            memory = x
        if not self.causal:
            return self.memory_output(x, memory, None)
        return self.memory_output(x, memory, torch.arange(start, start + x.shape[1], device=x.device))


__all__ = ["HCAMLayer", "sinusoid_position_encoding"]
