"""``aaren``: Attention as an RNN (Feng et al., arXiv 2405.13956): softmax attention computed as a
prefix scan with the associative operator on ``(m, u, w)`` = (running max, denominator, numerator):

    (mA, uA, wA) (+) (mB, uB, wB) = (m, uA e^(mA-m) + uB e^(mB-m), wA e^(mA-m) + wB e^(mB-m)),  m = max(mA, mB)
    leaf_j = (s_j, 1, v_j),  s_j = scale q.k_j;   prefix_k = leaf_1 (+) ... (+) leaf_k,  o_k = w_k / u_k

Functional form (``ak.attend(..., method="aaren")``): the scan applied to every query, i.e. causal
softmax attention (bottom-right aligned) — noncausal is the "many-to-one" output, the full
softmax over all keys. It equals ``ak.reference`` with the causal mask. With one query for every
position — Aaren's learned query token, passed as ``q[:, :, :1].expand(-1, -1, L, -1)`` with
``shared_query=True`` — the scores depend on the key only and the many-to-many outputs cost
O(L (D + Dv)) per head with an O(Dv) state: this is the Aaren RNN. Per-position queries cost
O(Lq Lk) (the chunked form is then a flash-style scan over key chunks) and need a key/value cache
to decode, so ``forward_state`` requires ``shared_query=True``. With ``shared_query=True`` the
result depends on ``q[:, :, 0]`` only (the rows are checked equal) and its gradient flows to that
row; an expanded tensor sums it back into its source.

Layer (``ak.nn.Attention(dim, heads, method="aaren", causal=True)``): keys and values are
projections of the input, the query is a learned ``(H, head_dim)`` parameter, one per layer, not a
function of the input; causal gives the outputs of every prefix and decodes token by token with a
constant-size state ``(lse, normalized numerator)`` per head; noncausal gives every position the
many-to-one output. Stack layers with residuals / norms / MLPs like a Transformer block.

Forms (backends): ``chunked`` — shared query: the stable scan in log-sum-exp form (``o_t =
sum_j exp(s_j - Z_t) v_j``, ``Z`` = running log-sum-exp; every exponent <= 0); per-position
queries: the (+) operator applied chunk by chunk of keys to every query's ``(m, u, w)``;
``parallel`` — the masked softmax; ``recurrent`` — the RNN one key at a time with ``(m, u, w)``.

Sources: no official code was found (the spec records none). The operator, the learned query and
the constant-memory update are from the paper (arXiv 2405.13956, "Attention as an RNN", Sections
3.1-3.3 as summarised in our spec §4 [RECALL]); ``scale = D**-0.5`` is our default [UNVERIFIED].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ...call import ALL_PATTERNS, AttentionCall
from ...errors import ArgumentError, OptionError
from ...options import Option
from ...reference import causal_mask
from ...registry import MethodInfo, options, register
from ._gla import gla_chunked
from .base import CHUNK_SIZE, RecurrentMethod, three_forms


@dataclass
class AarenState:
    """Per head: ``lse (B, H)`` of the scores so far and ``w (B, H, 1, Dv)`` = ``sum softmax v``."""

    lse: torch.Tensor
    w: torch.Tensor


def _inputs(call: AttentionCall):
    wd = call.dtype if call.dtype == torch.float64 else torch.float32
    k, v = call.expanded_kv()
    return call.query.to(wd), k.to(wd), v.to(wd)


def _rows(call: AttentionCall, per_key: torch.Tensor) -> torch.Tensor:
    """Pick, for each query, the prefix output after the last key it sees (0 if none)."""
    if not call.is_causal:
        return per_key[:, :, -1:].expand(-1, -1, call.q_len, -1)
    pos = torch.arange(call.q_len, device=per_key.device) + call.causal_offset
    out = per_key[:, :, pos.clamp(min=0)]
    return torch.where((pos >= 0)[:, None], out, torch.zeros_like(out))


# -- shared query: the O(L) scan ----------------------------------------------------------------
def _scores(call, q, k):
    return (k @ q[:, :, :1].transpose(-1, -2))[..., 0] * call.scale  # (B, H, Lk)


def _shared_chunked(s, v, state: AarenState, chunk: int):
    """Prefix softmax outputs at every key, from ``state``; returns ``(B, H, L, Dv)`` and the state."""
    Z = torch.logaddexp(torch.logcumsumexp(s, 2), state.lse[:, :, None])
    g = torch.cat([-state.lse[:, :, None], -Z], 2)[..., None]
    ones = torch.ones_like(s)[..., None]
    out, w = gla_chunked(ones, torch.exp(s - Z)[..., None], v, g, state.w, chunk)
    return out, AarenState(Z[:, :, -1], w)


def _shared_recurrent(s, v):
    """The Aaren RNN: ``(m, u, w)`` updated one key at a time."""
    B, H, L = s.shape
    m = s.new_full((B, H), float("-inf"))
    u, w, outs = s.new_zeros(B, H), v.new_zeros(B, H, v.shape[-1]), []
    for j in range(L):
        m_new = torch.maximum(m, s[:, :, j])
        a, b = torch.exp(m - m_new), torch.exp(s[:, :, j] - m_new)
        u, w, m = u * a + b, w * a[..., None] + v[:, :, j] * b[..., None], m_new
        outs.append(w / u[..., None])
    return torch.stack(outs, 2)


# -- per-position queries -----------------------------------------------------------------------
def combine(a, b):
    """The (+) operator on ``(m, u, w)`` tuples; an empty side has ``m = -inf, u = 0, w = 0``."""
    m = torch.maximum(a[0], b[0])
    safe = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    ea, eb = torch.exp(a[0] - safe), torch.exp(b[0] - safe)
    return m, a[1] * ea + b[1] * eb, a[2] * ea[..., None] + b[2] * eb[..., None]


def _visible(call, lo, hi, device):
    if not call.is_causal:
        return None
    pos = torch.arange(call.q_len, device=device)[:, None] + call.causal_offset
    return torch.arange(lo, hi, device=device)[None, :] <= pos


def _finish(u, w):
    safe = torch.where(u == 0, torch.ones_like(u), u)
    return torch.where((u == 0)[..., None], torch.zeros_like(w), w / safe[..., None])


def _leaf_chunk(call, q, k, v, lo):
    """``(m, u, w)`` of the keys ``k, v`` at positions ``lo..`` for every query."""
    s = (q @ k.transpose(-1, -2)) * call.scale
    seen = _visible(call, lo, lo + k.shape[2], q.device)
    if seen is not None:
        s = s.masked_fill(~seen, float("-inf"))
    m = s.amax(-1)
    p = torch.exp(s - torch.where(torch.isinf(m), torch.zeros_like(m), m)[..., None])
    return m, p.sum(-1), p @ v


def _per_query_chunked(call, q, k, v, chunk):
    B, H, Lq, _ = q.shape
    acc = (q.new_full((B, H, Lq), float("-inf")), q.new_zeros(B, H, Lq), q.new_zeros(B, H, Lq, v.shape[-1]))
    # split, not k[:, :, lo:hi] per step: one backward op instead of a full-size zero gradient per chunk
    for i, (k_c, v_c) in enumerate(zip(k.split(chunk, 2), v.split(chunk, 2))):
        acc = combine(acc, _leaf_chunk(call, q, k_c, v_c, i * chunk))
    return _finish(acc[1], acc[2])


def _per_query_recurrent(call, q, k, v):
    """Every query's RNN ``(m, u, w)`` updated one key at a time (keys it cannot see are skipped)."""
    B, H, Lq, _ = q.shape
    s = (q @ k.transpose(-1, -2)) * call.scale
    seen = _visible(call, 0, call.k_len, q.device)
    m = q.new_full((B, H, Lq), float("-inf"))
    u, w = q.new_zeros(B, H, Lq), q.new_zeros(B, H, Lq, v.shape[-1])
    for j in range(call.k_len):
        sj = s[..., j] if seen is None else s[..., j].masked_fill(~seen[:, j], float("-inf"))
        m_new = torch.maximum(m, sj)
        ref = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
        a, b = torch.exp(m - ref), torch.exp(sj - ref)
        u, w, m = u * a + b, w * a[..., None] + b[..., None] * v[:, :, j, None, :], m_new
    return _finish(u, w)


# -- forms --------------------------------------------------------------------------------------
def chunked(call: AttentionCall) -> torch.Tensor:
    q, k, v = _inputs(call)
    if call.options["shared_query"]:
        s = _scores(call, q, k)
        per_key, _ = _shared_chunked(s, v, Aaren.empty_state(s, v), call.options["chunk_size"])
        return _rows(call, per_key).to(call.dtype)
    return _per_query_chunked(call, q, k, v, call.options["chunk_size"]).to(call.dtype)


def recurrent(call: AttentionCall) -> torch.Tensor:
    q, k, v = _inputs(call)
    if call.options["shared_query"]:
        return _rows(call, _shared_recurrent(_scores(call, q, k), v)).to(call.dtype)
    return _per_query_recurrent(call, q, k, v).to(call.dtype)


def weights(call: AttentionCall) -> torch.Tensor:
    """``(B, H, Lq, Lk)`` softmax probabilities (rows with no visible key are 0)."""
    q, k, _ = _inputs(call)
    s = (q @ k.transpose(-1, -2)) * call.scale
    if call.is_causal:
        s = s.masked_fill(~causal_mask(call.q_len, call.k_len, q.device), float("-inf"))
    m = s.amax(-1, keepdim=True)
    p = torch.exp(s - torch.where(torch.isinf(m), torch.zeros_like(m), m))
    den = p.sum(-1, keepdim=True)
    return p / torch.where(den == 0, torch.ones_like(den), den)


def parallel(call: AttentionCall) -> torch.Tensor:
    return (weights(call) @ _inputs(call)[2]).to(call.dtype)


_ENGINES = three_forms(chunked, parallel, recurrent)


@register
class Aaren(RecurrentMethod):
    info = MethodInfo(
        name="aaren", seed=(9,), family="R", kind="layer", patterns=ALL_PATTERNS, decode=True,
        summary="Aaren (attention as an RNN): softmax attention by a prefix scan; the layer's query is "
                "a learned token, so it decodes with constant memory",
        backends=tuple(e.name for e in _ENGINES), state_size="Dv + 1",
        options=options(
            Option("shared_query", "bool", False, "every position has the same query (Aaren's learned "
                   "token, q expanded along L): O(L) scan instead of O(Lq*Lk)"),
            CHUNK_SIZE),
        references="Feng et al. 2024, arXiv 2405.13956")

    def engines(self):
        return _ENGINES

    def validate(self, call):
        q = call.query
        if call.options["shared_query"] and not torch.equal(q, q[:, :, :1].expand_as(q)):
            raise OptionError(
                "method 'aaren': shared_query=True needs the same query at every position, but the rows "
                "of q differ. Pass q[:, :, :1].expand(-1, -1, L, -1), or shared_query=False.")

    def reference(self, call):
        return parallel(call)

    def materialize(self, call):
        """``(B, H, Lq, Lk)`` softmax probabilities (causal: bottom-right masked); ``W @ v`` is the
        output."""
        return weights(call)

    def sample_options(self, rng, q_len, k_len):
        return {"chunk_size": int(rng.integers(1, 40))}

    @staticmethod
    def empty_state(like: torch.Tensor, v: torch.Tensor) -> AarenState:
        B, H = like.shape[:2]
        return AarenState(like.new_full((B, H), float("-inf")), like.new_zeros(B, H, 1, v.shape[-1]))

    def init_state(self, batch, heads, head_dim, value_dim, *, dtype, device, options):
        wd = dtype if dtype == torch.float64 else torch.float32
        return AarenState(torch.full((batch, heads), float("-inf"), dtype=wd, device=device),
                          torch.zeros(batch, heads, 1, value_dim, dtype=wd, device=device))

    def forward_state(self, call, state: AarenState):
        if not call.options["shared_query"]:
            raise ArgumentError(
                "method 'aaren' decodes with a constant-size state only with a shared (learned) query: "
                "pass shared_query=True (per-position queries need the key/value cache of method='dense').")
        q, k, v = _inputs(call)
        out, state = _shared_chunked(_scores(call, q, k), v, state, call.options["chunk_size"])
        return out.to(call.dtype), state

    def build_layer(self, *, dim, heads, kv_heads, head_dim, causal, cross, context_dim, **options):
        return AarenLayer(self, dim, heads, kv_heads, head_dim, causal, cross, **options)


class AarenLayer(nn.Module):
    """Aaren's attention module: ``o = Aaren(q_learned, K = x Wk, V = x Wv)`` then ``Wo``."""

    def __init__(self, impl: Aaren, dim, heads, kv_heads, head_dim, causal, cross, **options):
        super().__init__()
        if cross:
            raise ArgumentError("method 'aaren' has a learned query and no cross-attention form (the "
                                "output would not depend on x); use cross=False, or method='dense'.")
        if options.get("shared_query") is False:
            raise ArgumentError("the aaren layer always shares its learned query; drop shared_query=False.")
        self.impl, self.causal = impl, causal
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.options = impl.info.options.validate({**options, "shared_query": True}, "aaren")
        self.query = nn.Parameter(torch.randn(heads, head_dim) * head_dim ** -0.5)
        self.k_proj = nn.Linear(dim, kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(dim, kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(heads * head_dim, dim, bias=False)

    def init_cache(self, batch=None):
        if not self.causal:
            raise ArgumentError("a noncausal aaren layer cannot decode token by token; build it with causal=True.")
        from ...nn.cache import AttentionCache

        return AttentionCache()

    def forward(self, x, context=None, cache=None):
        B, L, _ = x.shape
        k = self.k_proj(x).view(B, L, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, L, self.kv_heads, self.head_dim).transpose(1, 2)
        q = self.query.to(x.dtype)[None, :, None, :].expand(B, -1, L, -1)
        gqa = self.kv_heads != self.heads
        if cache is None:
            from ...api import attend

            out = attend(q, k, v, is_causal=self.causal, enable_gqa=gqa, method="aaren", **self.options)
        else:
            call = AttentionCall.build(q, k, v, None, 0.0, True, None, gqa).with_options(self.options)
            if cache.state is None:
                cache.state = self.impl.init_state(B, self.heads, self.head_dim, self.head_dim,
                                                   dtype=x.dtype, device=x.device, options=self.options)
            out, cache.state = self.impl.forward_state(call, cache.state)
            cache.position += L
        return self.o_proj(out.transpose(1, 2).reshape(B, L, self.heads * self.head_dim))
