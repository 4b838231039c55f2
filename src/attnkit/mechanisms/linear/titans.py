"""``titans``: Titans' neural long-term memory (LMM) and the memory-as-gate / memory-as-layer
architectures (Behrouz, Zhong, Mirrokni 2025, "Titans: Learning to Memorize at Test Time",
arXiv 2501.00663).

The memory ``M`` (an MLP whose weights are the state) learns at test time to map keys to values by
gradient descent with momentum and weight decay on ``loss = ||M(k_t) - v_t||_2^2`` (eqs. 12-14):

    S_t = eta_t S_{t-1} - theta_t grad loss(M_{t-1}; k_t, v_t)      (surprise: momentum + momentary)
    M_t = (1 - alpha_t) M_{t-1} + S_t                                  (forgetting)
    y_t = M_t(q_t)                                                     (retrieval, no update)

with data-dependent ``theta_t = max_lr * sigmoid(.)`` (step size), ``eta_t = sigmoid(.)`` (surprise
decay) and ``alpha_t = sigmoid(.)`` (forgetting), one scalar per kv head and token. Chunked training
(eq. 16-18, "mini-batch gradient descent"): inside a chunk of ``chunk_size`` tokens every gradient
is taken at the chunk-start weights ``M_{t'}``, the momentum and decay are linear recurrences; the
exact per-token recurrence is ``chunk_size=1``. The engine (``_memory``) computes this in three forms
that agree to rounding: ``chunked`` (dual, attention-like read), ``parallel`` (per-token weights of
a chunk built at once) and ``recurrent`` (token by token; decoding) -- chosen by ``layer.inner.form``.
The chunked form differs from the per-token recurrence for ``chunk_size > 1`` only by where the
gradients are taken; tests check equality of the forms per chunk size and ``chunk_size=1`` against
an independent per-token loop, and the delta rule for ``eta = alpha = 0`` with linear memory.

Variants (``variant=``):
- ``lmm``: the memory alone as the token mixer (the block of ``_memory_layer``).
- ``mag`` (default): memory as a gate. ``x~ = [P || x]`` with ``persistent_tokens`` learned tokens
  ``P``; ``y = SWA*(x~)`` (causal sliding-window attention of ``window`` keys in which the persistent
  positions stay visible), ``m = M(x~)``; ``o = W_o(RMSNorm(y) * sigmoid(RMSNorm(m)))`` per head.
- ``mal``: memory as a layer. ``y = LMM(x~)``; ``o = SWA*(y)`` (its own projections).
The persistent tokens pass through every branch (the memory is written with them first); they are
prepended once per sequence (the decode cache remembers their effect). MAC (memory as context) is
not implemented.

Confirmed in the paper (read in a public transcription of arXiv 2501.00663, white-richard/latent-space
``repos/nested_learning/google_papers/TITANs/TITANs.md``): the update rule and loss (eqs. 12-14),
chunk-wise gradients at ``M_{t'}`` with ``beta_i = prod (1 - alpha_j)`` (eq. 16), momentum as a linear
recurrence over the chunk (eq. 18), retrieval ``y_t = M*(q_t)`` (eq. 15), persistent tokens prepended
(eq. 19), MAG ``o = y (x) M(x~)`` with both branches normalised by learnable vector weights and then
passed through a non-linearity, MAL, SiLU q/k/v with l2-normalised q, k and a
depthwise conv after each projection (sec. 4.4); deeper memories (L_M = 1..4) help (sec. 5.5); models of
170M-760M parameters trained on 15B/30B FineWeb-Edu tokens at 4K context (sec. 5.1). Cross-checked with fla's
``fla/ops/titans/naive.py`` (read after the update, ``q_t @ M_t``; anchor refreshed every chunk).
Not in the paper (ours, [UNVERIFIED]): the memory MLP form ``x + LN(W_2 gelu(W_1 x))`` with expansion 4
(titans-pytorch's default ``ResidualNorm(MemoryMLP(depth 2))``); which MAG branch gets the sigmoid;
conv kernel 4; ``max_lr = 0.1``; initial gate biases (forgetting ~0.018, momentum 0.5, step 0.5 max_lr);
``window = 256``; RoPE in the sliding-window branch; ``persistent_tokens = 4`` (titans-pytorch's MAC
example); ``chunk_size = 16`` (fla's Titans reference default).
"""

from __future__ import annotations

import torch
from torch import nn

from ...errors import ArgumentError, ShapeError
from ...nn.cache import AttentionCache
from ...nn.rope import apply_rope
from ...options import Option
from ...registry import MethodInfo, options, register
from ._memory import Rule
from ._memory_layer import MemoryBlock, MemoryMethod, memory_options, scaled_normal, working_dtype
from .rat import softmax

QUERY_BLOCK = 128


class TitansMemory(MemoryBlock):
    """The LMM block: ``loss = ||M(k) - v||^2`` (gradient ``2 e``), momentum and forgetting."""

    def gate_biases(self):
        return {"lr": 0.0, "forget": -4.0, "momentum": 0.0}

    def rule(self):
        return Rule("titans", lambda e, extra: 2 * e)

    def gates(self, raw):
        theta = self.opts["max_lr"] * torch.sigmoid(raw["lr"])
        alpha = torch.sigmoid(raw["forget"]) if self.opts["forgetting"] else torch.zeros_like(theta)
        mu = torch.sigmoid(raw["momentum"]) if self.opts["momentum"] else torch.zeros_like(theta)
        return (theta, 1 - alpha, mu), {}

    def init_memory(self, dims):
        return scaled_normal(self.kv_heads, dims)


def window_attention(q, k, v, start, window, prefix, scale, past):
    """Causal softmax attention of ``q (B, H, L, D)`` (positions ``start ..``) where key ``j`` is
    visible to query ``t`` iff ``j <= t`` and (``j < prefix`` or ``j > t - window``). ``k, v`` of the new
    tokens; ``past = (prefix_k, prefix_v, recent_k, recent_v)`` from earlier calls. Returns the output
    and the new ``past`` (prefix keys, and the last ``window - 1`` others)."""
    B, H, L, D = q.shape
    pk, pv, rk, rv = past
    pos = start + torch.arange(L, device=q.device)
    n_new_prefix = max(0, min(L, prefix - start))
    PK, PV = torch.cat([pk, k[:, :, :n_new_prefix]], 2), torch.cat([pv, v[:, :, :n_new_prefix]], 2)
    RK, RV = torch.cat([rk, k[:, :, n_new_prefix:]], 2), torch.cat([rv, v[:, :, n_new_prefix:]], 2)
    r0 = start + n_new_prefix - rk.shape[2]  # position of RK[0]
    ppos = torch.arange(PK.shape[2], device=q.device)
    outs = []
    for a in range(0, L, QUERY_BLOCK):
        b = min(L, a + QUERY_BLOCK)
        t = pos[a:b, None]
        lo, hi = max(r0, int(pos[a]) - window + 1), int(pos[b - 1]) + 1
        kpos = torch.arange(lo, hi, device=q.device)
        keys = torch.cat([PK, RK[:, :, lo - r0:hi - r0]], 2)
        vals = torch.cat([PV, RV[:, :, lo - r0:hi - r0]], 2)
        visible = torch.cat([ppos[None, :] <= t, (kpos[None, :] <= t) & (kpos[None, :] > t - window)], 1)
        s = (q[:, :, a:b] @ keys.transpose(-1, -2)) * scale
        outs.append(softmax(s.masked_fill(~visible, float("-inf"))) @ vals)
    first = max(0, RK.shape[2] - (window - 1))
    return torch.cat(outs, 2), (PK, PV, RK[:, :, first:], RV[:, :, first:])


class SlidingAttention(nn.Module):
    """``SWA*``: sliding-window softmax attention with RoPE by position, the first ``prefix``
    positions always visible; ``heads_out(x, state) -> ((B, H, L, D), state)``."""

    def __init__(self, dim, heads, kv_heads, head_dim, window, prefix):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.window, self.prefix = window, prefix
        self.q_proj = nn.Linear(dim, heads * head_dim, bias=False)
        self.k_proj = nn.Linear(dim, kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(dim, kv_heads * head_dim, bias=False)

    def heads_out(self, x, state: dict | None):
        B, L, _ = x.shape
        H, Hkv, D = self.heads, self.kv_heads, self.head_dim
        wd = working_dtype(x)
        split = lambda t, n: t.view(B, L, n, D).transpose(1, 2).to(wd)  # noqa: E731
        q, k, v = split(self.q_proj(x), H), split(self.k_proj(x), Hkv), split(self.v_proj(x), Hkv)
        k, v = k.repeat_interleave(H // Hkv, 1), v.repeat_interleave(H // Hkv, 1)
        start = 0 if state is None else state["position"]
        pos = torch.arange(start, start + L, device=x.device)
        q, k = apply_rope(q, pos), apply_rope(k, pos)
        past = (k[:, :, :0],) * 2 * 2 if state is None else state["past"]
        y, past = window_attention(q, k, v, start, self.window, self.prefix, D ** -0.5, past)
        return y, {"position": start + L, "past": past}


class TitansLayer(nn.Module):
    """Titans as ``ak.nn.Attention``'s inner module (``variant`` lmm / mag / mal)."""

    def __init__(self, dim, heads, kv_heads, head_dim, opts):
        super().__init__()
        self.variant, self.n_persistent = opts["variant"], opts["persistent_tokens"]
        self.heads, self.head_dim = heads, head_dim
        self.persistent = nn.Parameter(torch.randn(self.n_persistent, dim) * 0.02)
        self.memory = TitansMemory(dim, heads, kv_heads, head_dim, opts)
        if self.variant != "lmm":
            self.attn = SlidingAttention(dim, heads, kv_heads, head_dim, opts["window"], self.n_persistent)
            self.out_proj = nn.Linear(heads * head_dim, dim, bias=False)
        if self.variant == "mag":
            self.norm_attn = nn.RMSNorm(head_dim, eps=1e-6)
            self.norm_memory = nn.RMSNorm(head_dim, eps=1e-6)

    @property
    def form(self) -> str:
        return self.memory.form

    @form.setter
    def form(self, value: str) -> None:
        self.memory.form = value

    def init_cache(self, batch=None) -> AttentionCache:
        return AttentionCache()

    def _merge(self, y: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        B, H, L, D = y.shape
        return self.out_proj(y.to(like.dtype).transpose(1, 2).reshape(B, L, H * D))

    def forward(self, x, context=None, cache: AttentionCache | None = None):
        if context is not None:
            raise ArgumentError("method 'titans' is self-attention only; do not pass context.")
        state = None if cache is None else cache.state
        drop = 0
        if state is None:
            state, drop = {}, self.n_persistent
            x_in = torch.cat([self.persistent.to(x.dtype).expand(x.shape[0], -1, -1), x], 1)
        else:
            x_in = x
        if self.variant == "lmm":
            out, state["memory"] = self.memory.step(x_in, state.get("memory"))
        elif self.variant == "mag":
            m, state["memory"] = self.memory.read(x_in, state.get("memory"))
            a, state["attn"] = self.attn.heads_out(x_in, state.get("attn"))
            gated = self.norm_attn(a.to(x.dtype)) * torch.sigmoid(self.norm_memory(m.to(x.dtype)))
            out = self._merge(gated, x)
        else:
            y, state["memory"] = self.memory.step(x_in, state.get("memory"))
            a, state["attn"] = self.attn.heads_out(y, state.get("attn"))
            out = self._merge(a, x)
        if cache is not None:
            cache.state, cache.position = state, cache.position + x.shape[1]
        return out[:, drop:]


@register
class Titans(MemoryMethod):
    info = MethodInfo(
        name="titans", family="R", kind="layer", seed=(17,), patterns=frozenset({"causal-self"}), decode=True,
        summary="Titans neural long-term memory (MLP learned at test time, momentum + forgetting); "
                "LMM, MAG (default) or MAL (layer)",
        state_size="3 x memory params per kv head (weights, momentum, chunk-start anchor) + conv taps; "
                   "mag/mal add keys/values of (window - 1 + persistent_tokens) tokens",
        options=options(
            *memory_options(),
            Option("momentum", "bool", True, "keep past surprise (eta_t S_{t-1}); False: eta = 0"),
            Option("forgetting", "bool", True, "weight decay (1 - alpha_t) M_{t-1}; False: alpha = 0"),
            Option("variant", "choice", "mag", "lmm: the memory alone; mag: memory gates sliding-window "
                   "attention; mal: memory then sliding-window attention", choices=("lmm", "mag", "mal")),
            Option("window", "int", 256, "sliding-window attention: keys visible to a query, itself "
                   "included (mag, mal)", low=1, high=1 << 20),
            Option("persistent_tokens", "int", 4, "learned tokens prepended to every sequence (0 = none)",
                   low=0, high=4096)),
        references="Behrouz, Zhong, Mirrokni 2025, arXiv 2501.00663 (Titans); "
                   "unofficial: github.com/lucidrains/titans-pytorch")

    def make_layer(self, dim, heads, kv_heads, head_dim, opts):
        if opts["variant"] != "lmm" and head_dim % 2:
            raise ShapeError(f"method 'titans' variant={opts['variant']!r} uses RoPE in its attention "
                             f"branch and needs an even head_dim, got {head_dim}.")
        return TitansLayer(dim, heads, kv_heads, head_dim, opts)

    def sample_options(self, rng, q_len, k_len):
        return {"chunk_size": int(rng.integers(1, 6)), "memory_depth": int(rng.integers(1, 3)),
                "variant": str(rng.choice(["lmm", "mag", "mal"])), "window": int(rng.integers(1, 8)),
                "persistent_tokens": int(rng.integers(0, 3))}
