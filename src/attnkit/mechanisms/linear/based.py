"""``based``: the linear-attention mixer of BASED (Arora et al., arXiv 2402.18668), normalized
linear attention with the 2nd-order Taylor feature map of ``exp``.

    phi(x) = [1, x * sqrt(scale), vec(x x^T) * scale / sqrt(2)]        (official: 1 + D + D^2 features)
    phi(q).phi(k) = 1 + s + s^2 / 2,   s = scale * q.k   (>= 1/2 > 0)
    out_i = sum_{j visible} (1 + s_ij + s_ij^2/2) v_j / (sum_{j visible} (1 + s_ij + s_ij^2/2) + eps)

With the default ``scale = D**-0.5`` this is the official ``TaylorExp`` map (``x / D^(1/4)``,
``vec(x x^T) / (sqrt(2) sqrt(D))``, full ``D^2`` outer product). ``D`` here is BASED's small
feature dimension: BASED projects q and k to ``feature_dim = 16`` per head (273 features) and v to
the head dimension; pass q, k of that dimension to ``ak.attend``. The layer,
``ak.nn.Attention(dim, heads, method="based", causal=True, feature_dim=16)``, is the official
``LinearAttention`` mixer: bias-free projections of q, k to ``heads x feature_dim`` and of v to
``heads x head_dim``, this op, concatenated heads, output projection, no norm; it decodes with
the ``(S, z)`` state.

BASED's sliding-window attention is a *separate layer* in the official model (the 360M config mixes
gated short convolutions, these linear-attention layers at layers 1, 6, 11, 16, 21 and
sliding-window softmax layers at 2, 7, 12, 17, 22); it is not summed with this op. Build it with
``method="sliding_window", window=65``: the official ``SlidingAttention(window_size=128)`` passes
``window_size=(128 // 2, 0)`` to FlashAttention, i.e. 64 previous keys plus the query itself.

Forms (backends): ``chunked`` — within a chunk the kernel ``1 + s + s^2/2`` directly on q, k
(no feature expansion), across chunks the feature-space prefix state ``S = sum phi(k) v^T``
``((1+D+D^2) x Dv)`` and ``z = sum phi(k)``; ``parallel`` — the ``Lq x Lk`` kernel matrix;
``recurrent`` — token by token with ``(S, z)``. Noncausal and cross use the same sums over all
keys (mathematically fine; the official code is causal only). A query with no visible key gives 0.

Confirmed in HazyResearch/based (snapshot 2025-06-05): ``based/models/mixers/linear_attention.py``
(``TaylorExp``: ``[x[..., :1]**0, x / rrd, x2 / rd]`` with ``x2 = (x x^T).flatten() / sqrt(2)``,
``rd = sqrt(D)``, ``rrd = sqrt(rd)``; ``LinearAttention``: ``feature_dim = 16``, ``eps = 1e-12``
added to the denominator, no output norm; ``parallel_forward`` "quadratic": ``tril(phi(Q) phi(K)^T)
V / (phi(Q).cumsum(phi(K)) + eps)``; ``recurrent_forward``: ``kv_state += k v``, ``k_state += k``);
``based/models/mixers/slide_attention.py`` (``window = (window_size // 2, 0)``, causal).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ...call import ALL_PATTERNS, AttentionCall
from ...errors import ArgumentError, OptionError
from ...options import Option
from ...patterns.plan import cdiv
from ...reference import causal_mask
from ...registry import MethodInfo, options, register
from ._gla import lower
from .base import CHUNK_SIZE, RecurrentMethod, causal_split, three_forms


@dataclass
class BasedState:
    """``kv (B, H, F, Dv)`` and ``k_sum (B, H, F)``, F = 1 + D + D(D+1)/2: feature-space sums so far."""

    kv: torch.Tensor
    k_sum: torch.Tensor


def taylor_features(x: torch.Tensor, scale: float) -> torch.Tensor:
    """``phi(x)`` of shape ``(..., 1 + D + D(D+1)/2)`` with ``phi(q).phi(k) = 1 + s + s^2/2``,
    ``s = scale q.k``: the official map with the symmetric outer product folded (``x_i x_j`` for
    i < j once, weighted sqrt(2)), which gives the same kernel with about half the state."""
    D = x.shape[-1]
    i, j = torch.triu_indices(D, D, device=x.device)
    w = torch.full(i.shape, scale, dtype=x.dtype, device=x.device).masked_fill(i == j, scale * 2 ** -0.5)
    return torch.cat([torch.ones_like(x[..., :1]), x * scale ** 0.5, x[..., i] * x[..., j] * w], -1)


def kernel(q, k, scale):
    """``1 + s + s^2/2`` for all query/key pairs, ``(B, H, Lq, Lk)``."""
    s = (q @ k.transpose(-1, -2)) * scale
    return 1 + s + 0.5 * s * s


def _inputs(call: AttentionCall):
    wd = call.dtype if call.dtype == torch.float64 else torch.float32
    k, v = call.expanded_kv()
    return call.query.to(wd), k.to(wd), v.to(wd)


def _finish(num, den, call: AttentionCall):
    if not call.options["normalize"]:
        return num.to(call.dtype)
    den = den + call.options["eps"]
    safe = torch.where(den == 0, torch.ones_like(den), den)
    return torch.where((den == 0)[..., None], torch.zeros_like(num), num / safe[..., None]).to(call.dtype)


def _visible(call: AttentionCall, a: torch.Tensor) -> torch.Tensor:
    return a * causal_mask(call.q_len, call.k_len, a.device) if call.is_causal else a


# -- parallel ---------------------------------------------------------------------------------
def weights(call: AttentionCall) -> torch.Tensor:
    """``(B, H, Lq, Lk)`` normalized Taylor weights (rows sum to 1 when ``normalize``)."""
    q, k, _ = _inputs(call)
    a = _visible(call, kernel(q, k, call.scale))
    if not call.options["normalize"]:
        return a
    den = a.sum(-1, keepdim=True) + call.options["eps"]
    return torch.where(den == 0, torch.zeros_like(a), a / torch.where(den == 0, torch.ones_like(den), den))


def parallel(call: AttentionCall) -> torch.Tensor:
    q, k, v = _inputs(call)
    a = _visible(call, kernel(q, k, call.scale))
    return _finish(a @ v, a.sum(-1), call)


# -- chunked ----------------------------------------------------------------------------------
def chunked_causal(q, k, v, kv0, z0, scale: float, chunk: int):
    """Aligned causal (``Lq == Lk``) from the feature-space state ``(kv0, z0)``; returns ``num``,
    ``den`` and the final state."""
    B, H, L, D = q.shape
    n = cdiv(L, chunk)
    pad = n * chunk - L
    if pad:
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
    Q, K, V = (t.reshape(B, H, n, chunk, t.shape[-1]) for t in (q, k, v))
    PK = taylor_features(K, scale)
    if pad:  # phi(0) = [1, 0, ...]: keep padded keys out of the state
        PK = PK * (torch.arange(n * chunk, device=q.device) < L).reshape(n, chunk, 1).to(PK.dtype)
    kv = PK.transpose(-1, -2) @ V  # (B, H, n, F, Dv)
    kz = PK.sum(3)
    kv_before = kv0[:, :, None] + torch.cumsum(kv, 2) - kv
    z_before = z0[:, :, None] + torch.cumsum(kz, 2) - kz
    a = kernel(Q, K, scale) * lower(chunk, q.device)  # padded keys sit after every real query
    PQ = taylor_features(Q, scale)
    num = PQ @ kv_before + a @ V
    den = (PQ @ z_before[..., None])[..., 0] + a.sum(-1)
    num = num.reshape(B, H, n * chunk, -1)[:, :, :L]
    den = den.reshape(B, H, n * chunk)[:, :, :L]
    return num, den, kv_before[:, :, -1] + kv[:, :, -1], z_before[:, :, -1] + kz[:, :, -1]


def _sums(k, v, scale):
    pk = taylor_features(k, scale)
    return pk.transpose(-1, -2) @ v, pk.sum(2)


def chunked(call: AttentionCall) -> torch.Tensor:
    q, k, v = _inputs(call)
    if not call.is_causal:
        kv, z = _sums(k, v, call.scale)
        pq = taylor_features(q, call.scale)
        return _finish(pq @ kv, (pq @ z[..., None])[..., 0], call)
    skip, prefix = causal_split(call)
    kv0, z0 = _sums(k[:, :, :prefix], v[:, :, :prefix], call.scale)
    num, den, _, _ = chunked_causal(q[:, :, skip:], k[:, :, prefix:], v[:, :, prefix:], kv0, z0,
                                    call.scale, call.options["chunk_size"])
    if skip:
        num, den = F.pad(num, (0, 0, skip, 0)), F.pad(den, (skip, 0))
    return _finish(num, den, call)


# -- recurrent --------------------------------------------------------------------------------
def recurrent(call: AttentionCall) -> torch.Tensor:
    q, k, v = _inputs(call)
    pq, pk = taylor_features(q, call.scale), taylor_features(k, call.scale)
    kv = pq.new_zeros(*pq.shape[:2], pq.shape[-1], v.shape[-1])
    z = pq.new_zeros(*pq.shape[:2], pq.shape[-1])
    last = [i + call.causal_offset if call.is_causal else call.k_len - 1 for i in range(call.q_len)]
    nums = [pq.new_zeros(*pq.shape[:2], v.shape[-1])] * call.q_len
    dens = [pq.new_zeros(pq.shape[:2])] * call.q_len
    emit: dict[int, list[int]] = {}
    for i, j in enumerate(last):
        emit.setdefault(j, []).append(i)
    for j in range(call.k_len):
        kv = kv + pk[:, :, j, :, None] * v[:, :, j, None, :]
        z = z + pk[:, :, j]
        for i in emit.get(j, ()):
            nums[i] = torch.einsum("bhf,bhfe->bhe", pq[:, :, i], kv)
            dens[i] = (pq[:, :, i] * z).sum(-1)
    return _finish(torch.stack(nums, 2), torch.stack(dens, 2), call)


_ENGINES = three_forms(chunked, parallel, recurrent)


@register
class Based(RecurrentMethod):
    info = MethodInfo(
        name="based", seed=(73,), family="R", kind="layer", patterns=ALL_PATTERNS, decode=True,
        summary="BASED linear attention: 2nd-order Taylor feature map of exp(q.k/sqrt(D)), normalized",
        backends=tuple(e.name for e in _ENGINES), state_size="(1+Dk+Dk(Dk+1)/2)*(Dv+1)",
        options=options(
            Option("normalize", "bool", True, "divide by sum_j phi(q).phi(k_j) (BASED: always; "
                   "False = fla's use_norm=False)"),
            Option("eps", "float", 1e-12, "added to the normalizer (BASED: 1e-12)", low=0.0),
            Option("feature_dim", "int", None, "q/k feature dimension d' (BASED: 16); the layer "
                   "projects q, k to it (None: 16); functional calls take it from q (must match if given)",
                   low=1, nullable=True),
            CHUNK_SIZE),
        references="Arora et al. 2024, arXiv 2402.18668; github.com/HazyResearch/based")

    def engines(self):
        return _ENGINES

    def validate(self, call):
        fd = call.options["feature_dim"]
        if fd is not None and fd != call.head_dim:
            raise OptionError(
                f"method 'based': feature_dim={fd} but q and k have head dim {call.head_dim}; the "
                f"functional op takes the feature dimension from q: drop feature_dim or project q, k to {fd}.")

    def reference(self, call):
        return parallel(call)

    def materialize(self, call):
        """``(B, H, Lq, Lk)`` Taylor weights ``(1 + s + s^2/2) / row sum`` (unnormalized when
        ``normalize=False``); ``W @ v`` is the output."""
        return weights(call)

    def sample_options(self, rng, q_len, k_len):
        return {"normalize": bool(rng.random() < 0.8), "chunk_size": int(rng.integers(1, 40))}

    def init_state(self, batch, heads, head_dim, value_dim, *, dtype, device, options):
        wd = dtype if dtype == torch.float64 else torch.float32
        f = 1 + head_dim + head_dim * (head_dim + 1) // 2
        return BasedState(torch.zeros(batch, heads, f, value_dim, dtype=wd, device=device),
                          torch.zeros(batch, heads, f, dtype=wd, device=device))

    def forward_state(self, call, state: BasedState):
        q, k, v = _inputs(call)
        num, den, kv, z = chunked_causal(q, k, v, state.kv, state.k_sum, call.scale,
                                         call.options["chunk_size"])
        return _finish(num, den, call), BasedState(kv, z)

    def build_layer(self, *, dim, heads, kv_heads, head_dim, causal, cross, context_dim, **options):
        return BasedLayer(self, dim, heads, kv_heads, head_dim, causal, cross, context_dim, **options)


class BasedLayer(nn.Module):
    """BASED's linear-attention mixer on ``x (B, L, dim)`` (``context`` for cross-attention)."""

    def __init__(self, impl: Based, dim, heads, kv_heads, head_dim, causal, cross, context_dim, **options):
        super().__init__()
        fd = options.get("feature_dim") or 16
        self.impl, self.causal, self.cross = impl, causal, cross
        self.heads, self.kv_heads, self.head_dim, self.feature_dim = heads, kv_heads, head_dim, fd
        self.options = impl.info.options.validate({**options, "feature_dim": fd}, "based")
        cdim = context_dim or dim
        self.proj_q = nn.Linear(dim, heads * fd, bias=False)
        self.proj_k = nn.Linear(cdim, kv_heads * fd, bias=False)
        self.proj_v = nn.Linear(cdim, kv_heads * head_dim, bias=False)
        self.out_proj = nn.Linear(heads * head_dim, dim, bias=False)

    def init_cache(self, batch=None):
        if not (self.causal or self.cross):
            raise ArgumentError("a noncausal based layer cannot decode token by token; build it with causal=True.")
        from ...nn.cache import AttentionCache

        return AttentionCache()

    def _heads(self, x, n, d):
        return x.view(x.shape[0], x.shape[1], n, d).transpose(1, 2)

    def forward(self, x, context=None, cache=None):
        from ...api import attend

        B, L, _ = x.shape
        q = self._heads(self.proj_q(x), self.heads, self.feature_dim)
        gqa = self.kv_heads != self.heads
        if self.cross:
            if cache is not None and cache.key is not None and context is None:
                k, v = cache.key, cache.value
            elif context is None:
                raise ArgumentError("a cross-attention based layer needs context=(B, M, context_dim).")
            else:
                k = self._heads(self.proj_k(context), self.kv_heads, self.feature_dim)
                v = self._heads(self.proj_v(context), self.kv_heads, self.head_dim)
                if cache is not None:
                    cache.key, cache.value = k, v
            out = attend(q, k, v, enable_gqa=gqa, method="based", **self.options)
        else:
            k = self._heads(self.proj_k(x), self.kv_heads, self.feature_dim)
            v = self._heads(self.proj_v(x), self.kv_heads, self.head_dim)
            if cache is None:
                out = attend(q, k, v, is_causal=self.causal, enable_gqa=gqa, method="based", **self.options)
            else:
                call = AttentionCall.build(q, k, v, None, 0.0, True, None, gqa).with_options(self.options)
                if cache.state is None:
                    cache.state = self.impl.init_state(B, self.heads, self.feature_dim, self.head_dim,
                                                       dtype=x.dtype, device=x.device, options=self.options)
                out, cache.state = self.impl.forward_state(call, cache.state)
                cache.position += L
        return self.out_proj(out.transpose(1, 2).reshape(B, L, self.heads * self.head_dim))
