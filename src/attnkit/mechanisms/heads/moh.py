"""``moh``: Mixture-of-Head attention (Jin et al., "MoH: Multi-Head Attention as Mixture-of-Head
Attention", arXiv 2410.11842). A layer: ``ak.nn.Attention(dim, heads, method="moh", ...)``.

Heads are experts. Heads ``0 .. h_s - 1`` are shared (always on), heads ``h_s .. H - 1`` routed; a
router on each token ``x_t`` (the layer input) picks ``k`` routed heads, and the layer output is a
weighted sum of head outputs instead of a plain one. With ``E = H - h_s`` routed heads:

    p     = softmax(x_t W_r)                                    (E,)   router probabilities
    m     = 1 on the top-k of p, 0 elsewhere
    g_r   = k * (p m) / max(sum(p m), eps)                      routed gates, sum to k
    g_s   = h_s * softmax(x_t W_s)  (1 when h_s = 1)            shared gates, sum to h_s
    a     = 2 * softmax(x_t W_0)                                (2,)  balance of the two groups
    g     = [a_0 g_s, a_1 g_r]  (g = g_r when h_s = 0; g = g_s when k = 0, which needs h_s = H)
    out_t = W_O concat_h(g_h * O_{t,h})                         O_h: head h's attention output

Shapes: x ``(B, L, dim)`` -> ``(B, L, dim)``; head outputs ``(B, H, L, head_dim)`` come from
``ak.attend`` with the method named by ``attention`` (any functional method, default exact softmax
``dense``; its options in ``attention_options``). The official code computes every head and
zeroes the unselected ones; so does this layer (no compute saving, same numbers).

Load-balancing loss, set at every forward on the layer (``layer.inner.aux_loss``; None without
routed heads), over the ``T`` tokens of that forward:

    me_e = mean_t p_{t,e},  ce_e = mean_t m_{t,e},  aux_loss = E * sum_e me_e ce_e

(= ``mean(me * ce) * E^2``; k for perfectly uniform routing). Add ``0.01 * mean over layers`` of it
to the training loss (MoH-ViT's weight; the official code records it only in training mode).
Decoding through ``layer.init_cache(batch)`` equals the forward: gates depend only on the token.

Confirmed in github.com/SkyworkAI/MoH (``MoH-ViT/attention.py``, ``MoH-DiT/models.py``): router
linears without bias, softmax then top-k, renormalised routed gates times k, shared gates
``softmax * h_s`` (ViT: ones when h_s = 1), the two-way ``softmax * 2`` balance, gates multiply
head outputs before the output projection, the loss formula (``mean(me * ce) * E * E``). Not here:
MoH-LLaMA3's parameter-free router (query-norm logits, binary gates).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...api import attend
from ...call import ALL_PATTERNS
from ...errors import ArgumentError, OptionError, ShapeError
from ...nn.cache import AttentionCache, cross_keys_values
from ...nn.rope import apply_rope
from ...options import Option
from ...registry import Method, MethodInfo, get_method, options, register


def head_gates(x, router, shared, balance, shared_heads: int, top_k: int):
    """Gates ``(T, H)`` and, with routed heads, the router probabilities and top-k mask ``(T, E)``
    for tokens ``x (T, dim)``. ``router`` / ``shared`` / ``balance`` are the linear maps W_r, W_s,
    W_0 (None where absent)."""
    T = x.shape[0]
    if top_k == 0:
        g = F.softmax(shared(x), dim=-1) * shared_heads if shared is not None else x.new_ones(T, 1)
        return g, None, None
    p = F.softmax(router(x), dim=-1)
    mask = F.one_hot(torch.topk(p, top_k, dim=-1).indices, p.shape[-1]).sum(-2).to(p.dtype)
    kept = p * mask
    g = kept / kept.sum(-1, keepdim=True).clamp_min(torch.finfo(p.dtype).eps) * top_k
    if shared_heads > 0:
        g_s = F.softmax(shared(x), dim=-1) * shared_heads if shared is not None else x.new_ones(T, 1)
        a = F.softmax(balance(x), dim=-1) * 2
        g = torch.cat([a[:, :1] * g_s, a[:, 1:] * g], dim=-1)
    return g, p, mask


def balance_loss(p: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``E * sum_e mean_t(p) mean_t(mask)`` for ``p``, ``mask`` of shape ``(T, E)``."""
    return (p.mean(0) * mask.mean(0)).sum() * p.shape[-1]


class MoHLayer(nn.Module):
    """Projections, router, per-head attention (``ak.attend``), gates, output projection."""

    def __init__(self, *, dim, heads, kv_heads, head_dim, causal, cross, context_dim, shared_heads,
                 routed_top_k, attention, attention_options, rope=False, rope_base=10000.0,
                 bias=False, backend="auto"):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.causal, self.cross, self.rope, self.rope_base = causal, cross, rope, rope_base
        self.shared_heads, self.top_k = shared_heads, routed_top_k
        self.attention, self.attention_options, self.backend = attention, attention_options, backend
        cdim = context_dim or dim
        self.q_proj = nn.Linear(dim, heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(cdim, kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(cdim, kv_heads * head_dim, bias=bias)
        self.o_proj = nn.Linear(heads * head_dim, dim, bias=bias)
        routed = heads - shared_heads
        self.router = nn.Linear(dim, routed, bias=False) if routed_top_k > 0 else None
        self.shared = nn.Linear(dim, shared_heads, bias=False) if shared_heads > 1 else None
        self.balance = nn.Linear(dim, 2, bias=False) if routed_top_k > 0 and shared_heads > 0 else None
        self.aux_loss: torch.Tensor | None = None
        self.last_gates: torch.Tensor | None = None

    def extra_repr(self) -> str:
        return (f"heads={self.heads} (shared {self.shared_heads}, routed top-{self.top_k} of "
                f"{self.heads - self.shared_heads}), attention={self.attention!r}")

    def _split(self, t, heads):
        B, L, _ = t.shape
        return t.view(B, L, heads, self.head_dim).transpose(1, 2)

    def _attend(self, q, k, v, causal):
        return attend(q, k, v, is_causal=causal, enable_gqa=self.kv_heads != self.heads,
                      method=self.attention, backend=self.backend, **self.attention_options)

    def init_cache(self, batch: int | None = None) -> AttentionCache:
        if not self.cross and not self.causal:
            raise ArgumentError("a noncausal self-attention layer cannot decode token by token; "
                                "build it with causal=True.")
        if not get_method(self.attention).info.decode:
            raise ArgumentError(f"moh's attention={self.attention!r} does not support decoding.")
        return AttentionCache()

    def forward(self, x, context=None, cache: AttentionCache | None = None):
        if x.dim() != 3:
            raise ShapeError(f"x must be (B, L, dim), got {tuple(x.shape)}.")
        B, L, dim = x.shape
        q = self._split(self.q_proj(x), self.heads)
        if self.cross:
            k, v = cross_keys_values(self, context, cache)
            heads = self._attend(q, k, v, False)
        else:
            start = 0 if cache is None else cache.position
            k = self._split(self.k_proj(x), self.kv_heads)
            v = self._split(self.v_proj(x), self.kv_heads)
            if self.rope:
                pos = torch.arange(start, start + L, device=x.device)
                q, k = apply_rope(q, pos, self.rope_base), apply_rope(k, pos, self.rope_base)
            if cache is not None:
                cache.position += L
                k, v = cache.append(k, v)
            heads = self._attend(q, k, v, self.causal)
        g, p, mask = head_gates(x.reshape(B * L, dim), self.router, self.shared, self.balance,
                                self.shared_heads, self.top_k)
        self.aux_loss = None if p is None else balance_loss(p, mask)
        self.last_gates = g.detach().view(B, L, -1)
        gated = heads * g.view(B, L, -1).transpose(1, 2)[..., None]
        return self.o_proj(gated.transpose(1, 2).reshape(B, L, self.heads * self.head_dim))


@register
class MoH(Method):
    info = MethodInfo(
        layer_settings=frozenset({"rope", "rope_base", "bias", "backend"}),
        name="moh", family="N", kind="layer", patterns=ALL_PATTERNS, decode=True, seed=(70,),
        summary="Mixture-of-Head attention: router picks top-k routed heads + shared heads, "
                "weighted sum of head outputs, balance loss (layer)",
        options=options(
            Option("shared_heads", "int", None, "always-active heads h_s (the first ones); "
                   "None = heads // 2", low=0, nullable=True),
            Option("routed_top_k", "int", None, "routed heads active per token (top-k of the "
                   "router); None = half of the routed heads, at least 1", low=0, nullable=True),
            Option("attention", "object", "dense", "name of the functional method each head "
                   "computes (e.g. 'dense', 'sliding_window', 'sigmoid')"),
            Option("attention_options", "object", None, "options of that method (a dict; checked "
                   "against it)", nullable=True)),
        references="Jin et al. 2024, arXiv 2410.11842; github.com/SkyworkAI/MoH")

    def resolve(self, heads: int, opts: dict[str, Any]) -> tuple[int, int]:
        shared = heads // 2 if opts["shared_heads"] is None else opts["shared_heads"]
        routed = heads - shared
        top_k = (max(1, routed // 2) if routed else 0) if opts["routed_top_k"] is None else opts["routed_top_k"]
        if shared > heads:
            raise OptionError(f"method 'moh': shared_heads={shared} exceeds heads={heads}; use 0..{heads}.")
        if top_k > routed:
            raise OptionError(f"method 'moh': routed_top_k={top_k} exceeds the {routed} routed heads "
                              f"(heads={heads} - shared_heads={shared}); use 0..{routed}.")
        if top_k == 0 and routed > 0:
            raise OptionError(f"method 'moh': routed_top_k=0 leaves the {routed} routed heads always "
                              f"off; use routed_top_k in 1..{routed} or shared_heads={heads}.")
        return shared, top_k

    def build_layer(self, *, dim, heads, kv_heads, head_dim, causal, cross, context_dim, **options):
        settings = {k: options.pop(k) for k in ("rope", "rope_base", "bias", "backend") if k in options}
        opts = self.info.options.validate(options, "moh")
        shared, top_k = self.resolve(heads, opts)
        name = opts["attention"]
        if not isinstance(name, str) or not get_method(name).engines():
            raise OptionError(f"method 'moh': attention={name!r} must name a functional method "
                              "(one ak.attend runs, e.g. 'dense'), not a layer method.")
        inner = opts["attention_options"] or {}
        if not isinstance(inner, dict):
            raise OptionError(f"method 'moh': attention_options must be a dict of "
                              f"{opts['attention']!r} options, got {type(inner).__name__}.")
        get_method(opts["attention"]).info.options.validate(inner, opts["attention"])
        return MoHLayer(dim=dim, heads=heads, kv_heads=kv_heads, head_dim=head_dim, causal=causal,
                        cross=cross, context_dim=context_dim, shared_heads=shared, routed_top_k=top_k,
                        attention=opts["attention"], attention_options=dict(inner), **settings)

    def sample_options(self, rng, q_len, k_len):
        """Configurations valid for any ``heads >= 4`` (sample_options does not see the heads)."""
        opts = {"shared_heads": [None, 0, 1, 2][int(rng.integers(4))],
                "routed_top_k": [None, 1, 2][int(rng.integers(3))]}
        if rng.random() < 0.3:
            opts["attention"] = "sliding_window"
            opts["attention_options"] = {"window": int(rng.integers(1, 8))}
        return opts
