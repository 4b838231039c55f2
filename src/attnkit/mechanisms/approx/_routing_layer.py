"""The ``routing`` layer: projections, centroids as buffers with the official EMA update, the
commitment loss, and decoding through the causal scan's carry (see ``routing.py``).

Centroid update (training mode, no gradient; official ``online_kmeans`` with ``ema=True``), for the
normalized queries and then, unless ``share_qk``, the normalized keys ``x̃`` of the batch::

    a_t = argmax_c x̃_t·μ_c;   n_c = #{t: a_t = c};   S_c = Σ_{a_t = c} x̃_t
    N_c ← d N_c + (1 - d) n_c;   M_c ← d M_c + (1 - d) S_c          (d = ema_decay)
    μ_c = M_c / ((N_c + ε) / (Σ N + C ε) · Σ N),   ε = 1e-5

``aux_loss = commitment · mean((x̃ - sg(μ_{a}))²)`` summed over queries and (unshared) keys, set
at every forward (add it to the training loss). Buffers: ``centroids (H, C, D)`` (initialized
``LN(randn)`` from ``seed``, or the given ``centroids``), ``ema_count (H, C)``, ``ema_means (H, C, D)``.

Scores: ``q̃·k̃`` unscaled with ``normalize=True`` (official), ``q·k / sqrt(D)`` otherwise. The
official code multiplies q by ``D^-0.5`` before the layer norm, which the norm undoes (up to its
eps); the layer skips it. ``share_qk`` (default for causal self-attention with ``kv_heads ==
heads``, as the official decoder) drops the key projection: keys are the queries. Decoding keeps
the scored keys, values and the scan's carry (``RoutingCache``); centroids are not updated there.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ...errors import ArgumentError, OptionError, ShapeError
from ...nn.rope import apply_rope
from . import _routing_core as core
from ._common import expand_heads, layer_norm
from .routing import LAYER_CLUSTERS, LAYER_WINDOW, initial_centroids

EMA_EPS = 1e-5


@dataclass
class RoutingCache:
    """Decode cache of a causal routing layer: ``key`` (the scored keys, normalized if
    ``normalize``) and ``value`` ``(B, H, T, ·)`` of the tokens so far, the scan's ``carry``, and
    ``position``. Cross-attention layers keep the context's keys/values here."""

    key: torch.Tensor | None = None
    value: torch.Tensor | None = None
    carry: core.Carry | None = None
    position: int = 0


class RoutingLayer(nn.Module):
    def __init__(self, *, dim, heads, kv_heads, head_dim, causal, cross, context_dim, options,
                 rope=False, rope_base=10000.0, bias=False):
        super().__init__()
        o = options
        if o["kmeans_iters"]:
            raise OptionError("method 'routing': kmeans_iters applies to functional calls; the layer's "
                              "centroids learn by the EMA update in training mode.")
        share = o["share_qk"]
        if share is None:
            share = causal and not cross and kv_heads == heads
        if share and (cross or kv_heads != heads):
            raise OptionError(f"method 'routing': share_qk=True needs self-attention with kv_heads == heads "
                              f"(got cross={cross}, heads={heads}, kv_heads={kv_heads}).")
        if rope and cross:
            raise ArgumentError("rope=True with cross=True is not supported.")
        mu = o["centroids"]
        C = mu.shape[-2] if mu is not None else (o["clusters"] or LAYER_CLUSTERS)
        if mu is None:
            mu = initial_centroids(heads, C, head_dim, o["seed"])
        elif tuple(mu.shape) not in {(C, head_dim), (heads, C, head_dim)}:
            raise OptionError(f"method 'routing': centroids has shape {tuple(mu.shape)}; the layer needs "
                              f"(C, {head_dim}) or ({heads}, C, {head_dim}).")
        mu = mu.detach().to(torch.get_default_dtype()).expand(heads, C, head_dim).clone()
        self.heads, self.kv_heads, self.head_dim, self.clusters = heads, kv_heads, head_dim, C
        self.causal, self.cross, self.share_qk, self.rope, self.rope_base = causal, cross, share, rope, rope_base
        self.window = o["window"] or LAYER_WINDOW
        self.normalize, self.eps, self.block = o["normalize"], o["eps_scatter"], o["block_size"]
        self.decay = 0.999 if o["ema_decay"] is None else o["ema_decay"]
        self.commitment = 1e-4 if o["commitment"] is None else o["commitment"]
        cdim = context_dim or dim
        self.q_proj = nn.Linear(dim, heads * head_dim, bias=bias)
        self.k_proj = None if share else nn.Linear(cdim, kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(cdim, kv_heads * head_dim, bias=bias)
        self.o_proj = nn.Linear(heads * head_dim, dim, bias=bias)
        self.register_buffer("centroids", mu)
        self.register_buffer("ema_count", torch.zeros(heads, C, dtype=mu.dtype))
        self.register_buffer("ema_means", mu.clone())
        self.aux_loss: torch.Tensor | None = None

    def extra_repr(self) -> str:
        return (f"heads={self.heads}, clusters={self.clusters}, window={self.window}, "
                f"share_qk={self.share_qk}, normalize={self.normalize}")

    def init_cache(self, batch=None) -> RoutingCache:
        if self.cross:
            raise ArgumentError("a routing cross-attention layer cannot decode one query at a time: a "
                                "query's clusters depend on every query of the call. Run it on the whole "
                                "target sequence.")
        if not self.causal:
            raise ArgumentError("a noncausal self-attention layer cannot decode token by token; build it "
                                "with causal=True.")
        return RoutingCache()

    def _split(self, t, heads):
        B, L, _ = t.shape
        return t.view(B, L, heads, self.head_dim).transpose(1, 2)

    def forward(self, x, context=None, cache: RoutingCache | None = None):
        if x.dim() != 3:
            raise ShapeError(f"x must be (B, L, dim), got {tuple(x.shape)}.")
        B, L, _ = x.shape
        if self.cross and context is None:
            raise ArgumentError("a cross-attention routing layer needs context=(B, M, context_dim).")
        src = context if self.cross else x
        q = self._split(self.q_proj(x), self.heads)
        k = q if self.share_qk else self._split(self.k_proj(src), self.kv_heads)
        v = self._split(self.v_proj(src), self.kv_heads)
        start = 0 if cache is None else cache.position
        if self.rope:
            pos = torch.arange(start, start + L, device=x.device)
            q = apply_rope(q, pos, self.rope_base)
            k = q if self.share_qk else apply_rope(k, pos, self.rope_base)
        k, v = expand_heads(k, self.heads), expand_heads(v, self.heads)
        mu = self.centroids[None]
        sims_q, sims_k = core.similarities(q, mu), core.similarities(k, mu)
        qa, ka = (layer_norm(q), layer_norm(k)) if self.normalize else (q, k)
        scale = 1.0 if self.normalize else self.head_dim ** -0.5
        self.aux_loss = self._commitment(q, None if self.share_qk else k)
        if cache is not None:
            out = self._step(cache, qa, ka, v, sims_q, sims_k, scale)
        elif self.causal:
            out = core.causal(qa, ka, v, sims_q, sims_k, self.window, self.window, scale, self.eps, self.block)
        else:
            out = core.noncausal(qa, ka, v, sims_q, sims_k, min(self.window, L), min(self.window, k.shape[2]),
                                 scale, self.eps)
        if self.training and cache is None:
            self._ema_update(q if self.share_qk else torch.cat([q, k], 2), separately=not self.share_qk, split=L)
        return self.o_proj(out.transpose(1, 2).reshape(B, L, self.heads * self.head_dim))

    def _step(self, cache: RoutingCache, qa, ka, v, sims_q, sims_k, scale):
        B, H = qa.shape[:2]
        cache.key = ka if cache.key is None else torch.cat([cache.key, ka], 2)
        cache.value = v if cache.value is None else torch.cat([cache.value, v], 2)
        if cache.carry is None:
            cache.carry = core.Carry.empty(B, H, self.clusters, self.window, self.window, qa.device)
        out = core.causal_scan(cache.carry, qa, cache.key, cache.value, sims_q, sims_k, cache.position,
                               scale, self.eps, self.block)
        cache.position += qa.shape[2]
        return out

    def _commitment(self, q, k):
        total = 0.0
        for x in (q, k):
            if x is None:
                continue
            xn = layer_norm(x)
            near = (xn.detach() @ self.centroids.transpose(-1, -2).to(xn.dtype)).argmax(-1)  # (B, H, L)
            mu = torch.gather(self.centroids.to(xn.dtype)[None].expand(xn.shape[0], -1, -1, -1), 2,
                              near[..., None].expand(*near.shape, xn.shape[-1]))
            total = total + ((xn - mu) ** 2).mean()
        return self.commitment * total

    @torch.no_grad()
    def _ema_update(self, items, separately: bool, split: int):
        """EMA update with the queries, then (unshared) the keys, one after the other."""
        parts = [items[:, :, :split], items[:, :, split:]] if separately else [items]
        for part in parts:
            x = layer_norm(part.detach()).to(self.centroids.dtype)
            hot = torch.nn.functional.one_hot((x @ self.centroids.transpose(-1, -2)).argmax(-1),
                                              self.clusters).to(x.dtype)
            count = hot.sum((0, 2))  # (H, C)
            sums = torch.einsum("bhlc,bhld->hcd", hot, x)
            self.ema_count.mul_(self.decay).add_(count, alpha=1 - self.decay)
            self.ema_means.mul_(self.decay).add_(sums, alpha=1 - self.decay)
            n = self.ema_count.sum(-1, keepdim=True)
            smoothed = (self.ema_count + EMA_EPS) / (n + self.clusters * EMA_EPS) * n
            self.centroids.copy_(self.ema_means / smoothed[..., None])
