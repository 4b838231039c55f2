"""``h2o``: Heavy-Hitter Oracle KV-cache eviction (Zhang et al. 2023, H2O, arXiv 2306.14048).

A decode cache of at most ``C = heavy + recent`` entries: the ``recent`` newest tokens and the
``heavy`` tokens with the largest accumulated attention probability. Per batch element and kv
head (scores summed over the kv head's query heads under GQA), with queries at positions t::

    row t sees           kept_{t-1} ∪ {t}; softmax over those keys only (exact on that mask)
    accumulate           acc[j] += p_tj for every key j it sees (a new key starts at p_tt)
    evict (after row t)  when more than C entries are kept: keep positions > t - recent and the
                         `heavy` largest acc among the others; an evicted key never returns
    prefill              rows t < max(prefill, C + 1) see every earlier key (nothing is evicted
                         before the cache overflows or before the prompt ends), then the cache is
                         cut to C at once

So the full-sequence mask is ``M[i, j] = j <= i < until[j]``, ``until[j]`` the row whose cache
no longer holds key j (:class:`~attnkit.patterns.EvictionTimes`), and ``ak.attend`` runs exact
attention on it (``kind="exact"``: ``oracle_inputs`` is that mask).

Decoding. ``ak.nn.Attention(..., method="h2o")`` decodes through :class:`H2OState` (keys and
values of the kept entries, their positions and accumulated scores) instead of the plain growing
key/value cache: memory stays ``O(C)``. "Decode equals forward" means: stepping the tokens one at
a time (or in chunks) gives the outputs of the full forward on the eviction mask above — both run
the same eviction sequence (this module's :func:`advance`), and the test checks it. The
selection is sequential over tokens by nature (each eviction depends on the previous ones): a
forward loops over rows after the cache first overflows, batched over batch and heads.

Budget. ``heavy`` and ``recent`` (token counts; the official real-drop cache) or ``density``:
``C = ceil(density * Lk)``, split evenly (heavy = C // 2, recent = the rest), the paper's
"20% KV budget" being ``density=0.2`` (heavy_ratio = recent_ratio = 0.1): the default. A density
needs the sequence length, so decoding takes ``heavy`` and ``recent``.

Confirmed in FMInference/H2O @ ac75c2a ``h2o_hf/utils_real_drop/modify_llama.py``
(``H2OKVCache_LayerWise``): ``cache_size = hh_size + recent_size``, no eviction while
``seq_len <= cache_size``, keep ``topk(hh_score[:, :seq_len - recent_size], hh_size)`` plus the last
``recent_size`` positions, ``_update_hh_score`` adds the new rows' softmax probabilities (the new
token starting with its own), the cache updated after every forward (prefill included: full
causal prompt, then one cut). Differences: the official score sums over the batch (one eviction
for all sequences) and assumes ``H == Hkv``; here each batch element and kv head evicts on its
own (scores summed over the kv head's query heads); probabilities are accumulated in float32 /
float64 (official: the model dtype). The official lm-eval "global statistics" simulation (which
reads future rows) is not this method.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ...call import AttentionCall
from ...errors import OptionError
from ...options import Option
from ...patterns.selection import EvictionTimes
from ...registry import MethodInfo, options, register
from ..pattern_method import BLOCK_SIZE, MASK_BACKENDS
from .base import DynamicMethod, by_query_head, density_option, rows_per_chunk, serial_on_cpu, work_dtype

PAPER_DENSITY = 0.2


@dataclass
class H2OState:
    """One layer's eviction state, per batch element and kv head: ``key (B, Hk, n, D)``,
    ``value (B, Hk, n, Dv)`` (None while only selecting), ``pos (B, Hk, n)`` positions and
    ``acc (B, Hk, n)`` accumulated probabilities of the kept entries, ``length`` tokens seen.
    Once the cache is full the buffers hold one more slot (``spare``) for the incoming token.
    When recording a selection, ``until (B, Hk, L)`` is the row from which each key is evicted."""

    key: torch.Tensor | None = None
    value: torch.Tensor | None = None
    pos: torch.Tensor | None = None
    acc: torch.Tensor | None = None
    length: int = 0
    spare: bool = False
    until: torch.Tensor | None = None
    evicted: list = field(default_factory=list)  # (row, positions (B, Hk, 1)) not yet written to until

    @property
    def size(self) -> int:
        """Entries kept (the spare slot excluded)."""
        return 0 if self.key is None else self.key.shape[2] - int(self.spare)

    def positions(self) -> torch.Tensor:
        """Positions of the kept entries ``(B, Hk, size)`` (unordered once eviction started)."""
        return self.pos[..., : self.size]


def budget(options: dict, k_len: int | None, method: str = "h2o") -> tuple[int, int]:
    """``(heavy, recent)`` from the options (see the module docstring)."""
    heavy, recent, density = options["heavy"], options["recent"], options["density"]
    if density is not None and (heavy is not None or recent is not None):
        raise OptionError(f"method {method!r}: pass either density={density} or heavy/recent "
                          f"(got heavy={heavy}, recent={recent}), not both.")
    if (heavy is None) != (recent is None):
        raise OptionError(f"method {method!r}: pass both heavy= and recent= (got heavy={heavy}, "
                          f"recent={recent}); the cache holds heavy + recent tokens.")
    if heavy is None:
        density = PAPER_DENSITY if density is None else density
        if k_len is None:
            raise OptionError(f"method {method!r}: density={density} sets the cache as a fraction of the "
                              "sequence length, which decoding does not know; pass heavy= and recent=.")
        size = max(1, math.ceil(density * k_len - 1e-9))
        heavy = size // 2
        return heavy, size - heavy
    if heavy + recent < 1:
        raise OptionError(f"method {method!r}: heavy={heavy} + recent={recent} must be >= 1 (the cache size).")
    return heavy, recent


def advance(state: H2OState, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None, scale: float,
            heavy: int, recent: int, prefill: int) -> torch.Tensor | None:
    """Run the next ``m`` tokens (``q (B, H, m, D)``, ``k (B, Hk, m, D)``, ``v`` or None) through
    the eviction cache; returns their outputs ``(B, H, m, Dv)`` when ``v`` is given. Work dtype:
    float64 for float64 inputs, else float32. Selecting (``v`` None) updates buffers in place;
    decoding does not (the outputs may be differentiated)."""
    B, H, m, _ = q.shape
    cap = heavy + recent
    t_full = max(prefill, cap + 1)  # rows before this see every earlier key
    outs = []
    split = max(0, min(m, t_full - state.length))
    if split:
        outs.append(_dense_rows(state, q[:, :, :split], k[:, :, :split], None if v is None else v[:, :, :split],
                                scale))
        if state.length == t_full and state.size > cap:
            _evict_to(state, heavy, recent)
    with serial_on_cpu(q.device):
        for i in range(split, m):
            outs.append(_step(state, q[:, :, i], k[:, :, i], None if v is None else v[:, :, i], scale, recent))
    if state.until is not None and state.evicted:
        rows = torch.tensor([r for r, _ in state.evicted], device=q.device)
        gone = torch.cat([p for _, p in state.evicted], -1)
        state.until.scatter_(-1, gone, rows.expand_as(gone).contiguous())
        state.evicted.clear()
    return torch.cat(outs, dim=2) if v is not None else None


def _dense_rows(state: H2OState, q, k, v, scale):
    """Rows that see every earlier key: causal attention over cache + chunk, scores accumulated."""
    wd = work_dtype(q)
    B, H, m, D = q.shape
    Hk = k.shape[1]
    g = H // Hk
    n0 = state.size
    key = k.to(wd) if state.key is None else torch.cat([state.key, k.to(wd)], 2)
    value = None if v is None else (v.to(wd) if state.value is None else torch.cat([state.value, v.to(wd)], 2))
    pos = torch.arange(state.length, state.length + m, device=q.device).expand(B, Hk, m)
    pos = pos if state.pos is None else torch.cat([state.pos, pos], 2)
    acc = torch.zeros(B, Hk, n0 + m, dtype=wd, device=q.device)
    if state.acc is not None:
        acc[..., :n0] = state.acc
    out = None if v is None else torch.empty(B, H, m, value.shape[-1], dtype=wd, device=q.device)
    step = rows_per_chunk(B * H * (n0 + m), q.device)
    for r0 in range(0, m, step):
        r1 = min(m, r0 + step)
        s = (q[:, :, r0:r1].to(wd).reshape(B, Hk, g * (r1 - r0), D) @ key.transpose(-1, -2)) * scale
        s = s.view(B, Hk, g, r1 - r0, n0 + m)
        row = torch.arange(r0, r1, device=q.device)[:, None] + n0
        s = s.masked_fill(torch.arange(n0 + m, device=q.device) > row, float("-inf"))
        p = torch.softmax(s, -1)
        acc += p.detach().sum((2, 3))  # a statistic: no gradient
        if v is not None:
            out[:, :, r0:r1] = (p.reshape(B, Hk, g * (r1 - r0), -1) @ value).view(B, H, r1 - r0, -1)
    state.key, state.value, state.pos, state.acc = key, value, pos, acc
    state.length += m
    return out


def _evict_to(state: H2OState, heavy: int, recent: int) -> None:
    """Cut the cache to heavy + recent entries at once (entries are in position order here) and
    add the spare slot."""
    n = state.size
    old = state.acc[..., : n - recent]
    keep_heavy = torch.sort(old.topk(heavy, -1).indices, -1).values if heavy else old[..., :0].long()
    keep = torch.cat([keep_heavy, torch.arange(n - recent, n, device=old.device).expand(*old.shape[:-1], recent)], -1)
    keep = torch.cat([keep, keep[..., -1:]], -1)  # the spare slot starts as a copy of the last entry
    if state.until is not None:
        gone = torch.ones(state.pos.shape, dtype=torch.bool, device=old.device).scatter(-1, keep, False)
        state.until.scatter_(-1, state.pos, torch.where(gone, state.length, state.until.gather(-1, state.pos)))
    state.key = state.key.gather(2, keep[..., None].expand(-1, -1, -1, state.key.shape[-1]))
    if state.value is not None:
        state.value = state.value.gather(2, keep[..., None].expand(-1, -1, -1, state.value.shape[-1]))
    state.pos, state.acc = state.pos.gather(-1, keep), state.acc.gather(-1, keep)
    state.spare = True


def _step(state: H2OState, q, k, v, scale, recent):
    """One row on a full cache: the new token goes to the spare slot, the row attends every slot,
    scores accumulate, and the weakest unprotected entry is overwritten by the spare (when the
    new token itself is the weakest, nothing moves)."""
    wd = work_dtype(q)
    B, H, D = q.shape
    Hk = k.shape[1]
    t = state.length
    inplace = v is None
    key = _put_last(state.key, k.to(wd)[:, :, None], inplace)
    s = (q.to(wd).reshape(B, Hk, H // Hk, D) @ key.transpose(-1, -2)) * scale
    p = torch.softmax(s, -1)  # (B, Hk, g, C + 1)
    acc = _put_last(state.acc, torch.zeros_like(state.acc[..., :1]), inplace) + p.detach().sum(2)
    pos = _put_last(state.pos, torch.full_like(state.pos[..., :1], t), inplace)
    evict = acc.masked_fill(pos > t - recent, float("inf")).argmin(-1, keepdim=True)  # (B, Hk, 1)
    if state.until is not None:
        state.evicted.append((t + 1, pos.gather(-1, evict)))
    out = None
    if v is not None:
        value = _put_last(state.value, v.to(wd)[:, :, None], inplace)
        out = (p @ value).reshape(B, H, 1, -1)
        state.value = _move_last(value, evict, inplace)
    state.key = _move_last(key, evict, inplace)
    state.acc, state.pos = _move_last(acc, evict, True), _move_last(pos, evict, True)  # fresh tensors
    state.length += 1
    return out


def _put_last(buf: torch.Tensor, src: torch.Tensor, inplace: bool) -> torch.Tensor:
    """``buf`` with its last slot (dim 2) set to ``src``."""
    if inplace:
        buf[:, :, -1:] = src
        return buf
    return torch.cat([buf[:, :, :-1], src], 2)


def _move_last(buf: torch.Tensor, slot: torch.Tensor, inplace: bool) -> torch.Tensor:
    """Copy the last slot (dim 2) of ``buf`` into ``slot (B, Hk, 1)``."""
    idx = slot if buf.dim() == 3 else slot[..., None].expand(-1, -1, -1, buf.shape[-1])
    src = buf[:, :, -1:]
    return buf.scatter_(2, idx, src.clone()) if inplace else buf.scatter(2, idx, src)


@register
class H2O(DynamicMethod):
    info = MethodInfo(
        name="h2o", family="D", kind="exact", patterns=frozenset({"causal-self"}), decode=True, seed=(49,),
        summary="H2O: KV cache of heavy hitters (largest accumulated attention) + recent tokens",
        backends=MASK_BACKENDS, state_size="heavy + recent keys and values (+ scores)",
        options=options(
            Option("heavy", "int", None, "heavy-hitter tokens kept (hh_size)", low=0, nullable=True),
            Option("recent", "int", None, "most recent tokens kept (recent_size)", low=0, nullable=True),
            Option("prefill", "int", 0, "queries before this position attend densely (the prompt); the "
                   "cache is cut after it", low=0),
            density_option("the sequence kept in the cache (heavy + recent = ceil(density * Lk); "
                           "default 0.2, the paper's budget)"),
            BLOCK_SIZE),
        references="Zhang et al. 2023, H2O (arXiv 2306.14048); github.com/FMInference/H2O "
                   "h2o_hf/utils_real_drop/modify_llama.py")

    def check_options(self, call):
        budget(call.options, call.k_len, self.info.name)

    def select(self, call):
        heavy, recent = budget(call.options, call.k_len, self.info.name)
        q, k = call.query.detach(), call.key.detach()
        state = H2OState(until=torch.full((call.batch, call.kv_heads, call.k_len), call.k_len,
                                          dtype=torch.long, device=call.device))
        advance(state, q, k, None, call.scale, heavy, recent, call.options["prefill"])
        until = by_query_head(state.until, call.group)
        return self.selection(call, EvictionTimes(until), details={"heavy": heavy, "recent": recent,
                                                                   "until": until})

    # -- decoding through ak.nn.Attention ---------------------------------------------------------
    def init_state(self, batch, heads, head_dim, value_dim, *, dtype, device, options):
        budget(options, None, self.info.name)
        return H2OState()

    def forward_state(self, call: AttentionCall, state: H2OState):
        heavy, recent = budget(call.options, None, self.info.name)
        out = advance(state, call.query, call.key, call.value, call.scale, heavy, recent, call.options["prefill"])
        return out.to(call.dtype), state

    def bench_options(self, q_len, k_len, density=None):
        """The paper's 20 % cache; for ``density`` (kept causal pairs ~ c L - c^2/2 for a cache of
        c L tokens) the cache share ``c = 1 - sqrt(1 - 2 density)``."""
        if density is None:
            return {}
        return {"density": min(1.0, 1 - (1 - 2 * min(density, 0.5)) ** 0.5)}

    def sample_options(self, rng, q_len, k_len):
        heavy, recent = int(rng.integers(0, 6)), int(rng.integers(0, 6))
        return {"heavy": heavy, "recent": max(recent, 1 - heavy), "prefill": int(rng.choice([0, rng.integers(0, 12)]))}


__all__ = ["H2O", "H2OState", "advance", "budget"]
