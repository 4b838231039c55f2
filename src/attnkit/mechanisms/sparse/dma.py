"""``dma``: Dynamic Mask Attention — a value-derived key bias, added to the scores and used to keep
the top-``window`` keys of each query (Shi et al. 2025, arXiv 2508.02124).

For ``q (B, H, Lq, D)``, ``k (B, Hkv, Lk, D)``, ``v (B, Hkv, Lk, Dv)`` (query head h reads kv head
``g = h // (H / Hkv)``; the bias and the selection are shared by a kv head's query heads)::

    dt[b, j, :]   = dt_weight · concat_g v[b, g, j, :] + dt_bias        (Hkv values per key)
    β[b, g, j]    = A[g] · softplus(dt[b, j, g])                          (query-independent)
    candidates(i) = keys j <= i + Lk - Lq (causal) or every key
    Keep(i)       = the `window` candidates with the largest β (all of them when there are fewer);
                    ties go to the later key
    smoothing     (smooth_block = S, only when Lk > window): per query row, a block of S keys
                  [mS, (m+1)S) is kept entirely iff more than half of its keys are kept
                  (the tail block by the same rule over its length), then the causal mask again
    out           = softmax(q kᵀ · scale + β, masked by Keep) v       (exact: kind "exact")

Gradients reach ``v`` (and the ``A``, ``dt_weight``, ``dt_bias`` tensors) through the bias; the
selection itself uses ``β`` detached. Because ``β`` does not depend on the query, the causal
selection is an eviction history: key j is kept by queries at positions ``j <= a < until[j]``
(once a key leaves a prefix's top-window it never returns), computed without an ``Lq x Lk`` mask
(:class:`~attnkit.patterns.EvictionTimes`; ``O(Lk^2)`` comparisons in bounded chunks).

Parameters. The paper's ``A`` (per kv head, initialised to 0) and ``dt_proj``
(``Linear(Hkv·Dv -> Hkv)``) are trained with the model: ``ak.nn.Attention(dim, heads,
method="dma", learned=True, ...)`` owns them and passes them here as ``A=``, ``dt_weight=``,
``dt_bias=`` (see :mod:`._dma_layer`, with a small distillation utility). Without them
``ak.attend`` uses a **fixed stand-in**: ``A = 1`` and ``dt`` = the mean of each kv head's value
features (``dt_bias = 0``) — the paper's formula with arbitrary untrained weights, so the
selection exercises the method's computation but carries no learned notion of importance.

Budget. ``window`` (the paper's ``window_size``, default 2048) or ``density``:
``window = ceil(density * Lk)`` (``density=1`` is dense attention plus the bias). Giving both
raises OptionError.

Confirmed in SmallDoges/flash-dmattn @ f024c28: ``examples/modeling/modeling_doge.py``
(``DogeAttention``: ``A = zeros(num_key_value_heads)``, ``dt_proj = Linear(Hkv * head_dim, Hkv,
bias=attention_bias)`` on the concatenated value heads, ``attn_bias = A * softplus(dt)`` — the
comment notes ``exp(A * softplus(dt))`` in the paper, changed for stability — broadcast over
queries); ``flash_sparse_attn/utils/mask.py`` (``topk_mask``: bias detached, masked entries set to
the dtype minimum before ``topk(window)``, kept where the value is not that minimum;
``block_smooth``: ``count * 2 > block_size``, the tail by ``count * 2 > tail_len``);
``flash_sparse_attn/integrations/modeling_flash_sparse_attention_utils.py`` (a mask only when
``key_length > window_size``); ``flash_sparse_attn/flash_sparse_attn_flex.py`` (the bias added in
``score_mod``). Differences: the official top-k breaks ties arbitrarily (here: the later key);
with no padding mask the official path selects over every key before the kernel's causal mask,
which lets future keys' biases decide (a causal leak) — attnkit selects among the causally
visible keys, as the official path does when a 4-D causal mask is passed; the bias is computed
in float32 / float64 (official: the model dtype); Doge's q/k RMSNorm is a model choice, not DMA's.
"""

from __future__ import annotations

import math

import torch

from ...errors import OptionError
from ...options import Option
from ...patterns.interval import Full
from ...patterns.plan import cdiv
from ...patterns.selection import BlockSelection, EvictionTimes
from ...registry import MethodInfo, options, register
from ..pattern_method import BLOCK_SIZE, MASK_BACKENDS
from .base import DynamicMethod, by_query_head, density_option, resolve_budget, rows_per_chunk, work_dtype
from .seer import learned_option, refuse_learned

DEFAULT_WINDOW = 2048


def key_bias(call) -> torch.Tensor:
    """``β (B, Hkv, Lk)`` in the work dtype, differentiable through v and the parameters."""
    o = call.options
    wd = work_dtype(call.value)
    v = call.value.to(wd)
    B, Hk, Lk, Dv = v.shape
    if o["dt_weight"] is None:
        dt = v.mean(-1)  # the stand-in: each kv head's mean value feature
    else:
        dt = (v.transpose(1, 2).reshape(B, Lk, Hk * Dv) @ o["dt_weight"].to(wd).T).transpose(1, 2)
    if o["dt_bias"] is not None:
        dt = dt + o["dt_bias"].to(wd)[:, None]
    a = torch.ones(Hk, dtype=wd, device=v.device) if o["A"] is None else o["A"].to(wd)
    return a[:, None] * torch.nn.functional.softplus(dt)


def eviction_times(beta: torch.Tensor, window: int) -> torch.Tensor:
    """``until (B, Hkv, Lk)``: key j is in the top-``window`` of the prefix ``[0, a]`` (ties to the
    later key) exactly for ``j <= a < until[j]``; ``until[j] = j`` if never, ``Lk`` if never evicted.

    With keys ranked best first, j leaves the prefix's top-window when the ``window``-th better
    key arrives: ``until[j] = max(j, the window-th smallest position among keys ranked above j)``
    (``Lk`` when fewer than ``window`` keys rank above it). ``O(Lk^2)`` comparisons in chunks."""
    B, Hk, L = beta.shape
    rank = _ranks(beta)
    pos = torch.arange(L, device=beta.device)
    until = torch.empty(B, Hk, L, dtype=torch.long, device=beta.device)
    step = rows_per_chunk(6 * B * Hk * L, beta.device)
    for j0 in range(0, L, step):
        j1 = min(L, j0 + step)
        better = rank[:, :, None, :] < rank[:, :, j0:j1, None]  # (B, Hk, J, L)
        hit = better.to(torch.int32).cumsum(-1) >= window
        first = torch.where(hit[..., -1], hit.to(torch.int8).argmax(-1), L)
        until[:, :, j0:j1] = torch.maximum(first, pos[j0:j1])
    return until


def _ranks(beta: torch.Tensor) -> torch.Tensor:
    """Rank of every key by ``β`` (0 = largest; ties: the later key ranks higher)."""
    L = beta.shape[-1]
    order = L - 1 - torch.sort(beta.flip(-1), dim=-1, descending=True, stable=True).indices
    ranks = torch.arange(L, device=beta.device).expand_as(order)
    return torch.empty_like(order).scatter_(-1, order, ranks)


def top_window(beta: torch.Tensor, window: int) -> torch.Tensor:
    """Bool ``(B, Hkv, Lk)``: the ``window`` largest ``β`` over every key (ties to the later key)."""
    L = beta.shape[-1]
    if L <= window:
        return torch.ones_like(beta, dtype=torch.bool)
    order = torch.sort(beta.flip(-1), dim=-1, descending=True, stable=True).indices[..., :window]
    return torch.zeros_like(beta, dtype=torch.bool).scatter(-1, L - 1 - order, True)


def smoothed_rows(until: torch.Tensor, q_len: int, block: int) -> torch.Tensor:
    """Causal block smoothing: ``(B, Hkv, Lq, nS)`` kept blocks of ``block`` keys per query row
    (bottom-right aligned), from the eviction times (counts by prefix sums over positions)."""
    B, Hk, L = until.shape
    n = cdiv(L, block)
    pos = torch.arange(L, device=until.device)
    alive = until > pos
    delta = torch.zeros(B, Hk, L + 1, n, dtype=torch.int32, device=until.device)
    blk = (pos // block).expand(B, Hk, L)
    ones = alive.to(torch.int32)
    delta.view(B, Hk, -1).scatter_add_(-1, pos * n + blk, ones)
    delta.view(B, Hk, -1).scatter_add_(-1, until.clamp(max=L) * n + blk, -ones)
    counts = delta.cumsum(2)[:, :, :L]  # kept keys of each block, per query position
    sizes = (torch.clamp((torch.arange(n, device=until.device) + 1) * block, max=L)
             - torch.arange(n, device=until.device) * block)
    keep = counts * 2 > sizes
    rows = torch.arange(q_len, device=until.device) + (L - q_len)
    out = keep.index_select(2, rows.clamp(min=0))
    return out & (rows >= 0)[:, None]


def _add_key_bias(score, b, h, q, k, beta):
    """score_mod: ``score + β[b, h, k]`` (β expanded to the query heads; engines may pass padded
    key positions, which are masked anyway)."""
    return score + beta[b, h, k.clamp(max=beta.shape[-1] - 1)]


@register
class DMA(DynamicMethod):
    info = MethodInfo(
        name="dma", family="D", kind="exact", seed=(30,), decode=True,
        patterns=frozenset({"causal-self", "noncausal-self", "causal-cross", "noncausal-cross"}),
        summary="Dynamic Mask Attention: a value-derived key bias, added to the scores; top-window keys kept",
        backends=MASK_BACKENDS, layer_settings=frozenset({"rope", "rope_base", "bias", "backend"}),
        options=options(
            Option("window", "int", None, f"keys kept per query (window_size; default {DEFAULT_WINDOW})", low=1,
                   nullable=True),
            density_option("the keys: window = ceil(density * Lk)"),
            Option("smooth_block", "int", None, "block smoothing: keep a block of this many keys iff more than "
                   "half were kept (block_size)", low=2, nullable=True),
            Option("A", "tensor", None, "(Hkv,) bias scales (the paper's A); None: the stand-in A = 1", nullable=True),
            Option("dt_weight", "tensor", None, "(Hkv, Hkv*Dv) dt_proj weight; None: the stand-in (mean value "
                   "feature per kv head)", nullable=True),
            Option("dt_bias", "tensor", None, "(Hkv,) dt_proj bias", nullable=True),
            learned_option("A and dt_proj (initialised as the official Doge layer: A = 0)"),
            BLOCK_SIZE),
        references="Shi et al. 2025, Trainable Dynamic Mask Sparse Attention (arXiv 2508.02124); "
                   "github.com/SmallDoges/flash-dmattn flash_sparse_attn/utils/mask.py, "
                   "examples/modeling/modeling_doge.py")

    def check_options(self, call):
        o = call.options
        resolve_budget(self.info.name, o, "window", DEFAULT_WINDOW)
        refuse_learned(self.info.name, o, "A=, dt_weight=, dt_bias=")
        Hk, Dv = call.kv_heads, call.value_dim
        for name, shape in (("A", (Hk,)), ("dt_weight", (Hk, Hk * Dv)), ("dt_bias", (Hk,))):
            t = o[name]
            if t is not None and tuple(t.shape) != shape:
                raise OptionError(f"method 'dma': {name} has shape {tuple(t.shape)}; this call (Hkv={Hk}, "
                                  f"Dv={Dv}) needs {shape}.")

    def window(self, call) -> int:
        rule, value = resolve_budget(self.info.name, call.options, "window", DEFAULT_WINDOW)
        return max(1, math.ceil(value * call.k_len - 1e-9)) if rule == "density" else value

    def select(self, call):
        w = self.window(call)
        smooth = call.options["smooth_block"]
        beta = key_bias(call)  # (B, Hk, Lk), differentiable
        beta_sel = beta.detach()
        g = call.group
        details = {"window": w, "bias": beta}
        if call.is_causal:
            until = eviction_times(beta_sel, w)
            details["until"] = until
            if smooth is not None and call.k_len > w:
                tiles = by_query_head(smoothed_rows(until, call.q_len, smooth), g)
                pattern = BlockSelection(tiles, 1, smooth) & Full(causal=True)
            else:
                pattern = EvictionTimes(by_query_head(until, g))
        else:
            keep = top_window(beta_sel, w)
            details["keep"] = keep
            if smooth is not None and call.k_len > w:
                n = cdiv(call.k_len, smooth)
                counts = torch.nn.functional.pad(keep.int(), (0, n * smooth - call.k_len)).view(*keep.shape[:2], n,
                                                                                                  smooth).sum(-1)
                sizes = torch.clamp((torch.arange(n, device=keep.device) + 1) * smooth, max=call.k_len) \
                    - torch.arange(n, device=keep.device) * smooth
                pattern = BlockSelection(by_query_head((counts * 2 > sizes)[:, :, None], g), call.q_len, smooth)
            else:
                pattern = BlockSelection(by_query_head(keep[:, :, None], g), call.q_len, 1)
        return self.selection(call, pattern, details=details, score_mod=_add_key_bias,
                              mod_tensors=(by_query_head(beta, g),))

    def sample_options(self, rng, q_len, k_len, *, kv_heads=None):
        opts = {}
        if rng.random() < 0.5:
            opts["window"] = int(rng.integers(1, max(2, k_len + 3)))
        else:
            opts["density"] = float(rng.choice([0.1, 0.3, 0.6, 1.0]))
        if rng.random() < 0.3:
            opts["smooth_block"] = int(rng.integers(2, 6))
        if kv_heads is not None and rng.random() < 0.7:
            g = torch.Generator().manual_seed(int(rng.integers(0, 2**31)))
            opts["A"] = torch.randn(kv_heads, generator=g, dtype=torch.float64)
        return opts

    def bench_options(self, q_len, k_len, density=None):
        """The paper's window (2048) with the stand-in bias; ``density`` sets ``window = ceil(density
        * Lk)``, which keeps about that share of the pairs (fewer at the start of causal rows)."""
        return {} if density is None else {"density": density}

    # -- the learned layer ----------------------------------------------------------------------
    def owns_layer(self, options):
        return bool(options.get("learned"))

    def build_layer(self, **kwargs):
        from ._dma_layer import DMALayer

        return DMALayer(self, **kwargs)


__all__ = ["DMA", "eviction_times", "key_bias", "smoothed_rows", "top_window"]
