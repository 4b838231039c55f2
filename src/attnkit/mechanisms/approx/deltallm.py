"""``deltallm``: DeltaLLM's context-aware hybrid attention (Qi, Gao, Ren, Chen 2025, arXiv
2507.19608): exact attention inside a local window, a thresholded *delta* approximation outside.

**Reconstruction.** No official code was found and only the abstract was readable (the stored
arXiv page ends after it). The abstract says: consecutive tokens' attention changes little
(temporal sparsity); a "delta matrix" is built with a threshold so most of it is zero; full
attention is used in a local context window and the delta approximation outside it; it works in
prefill and decode. The two readings below follow attnkit's spec (``specs/sparse.md`` §17); treat
both as provisional until the paper's method section can be checked.

Shapes ``q (B, H, Lq, D)``, ``k, v (B, Hkv, Lk, ·)`` → ``(B, H, Lq, Dv)``; causal, bottom-right:
query i sits at ``a_i = i + Lk - Lq`` and sees keys ``j <= a_i``; ``w = window``, ``Θ = threshold``,
``s = scale``. Keys ``a_i - w < j <= a_i`` (the window, ``w`` keys with the query's own) get the
exact score ``s·q_i·k_j``; older keys get::

    variant "query" (default; a delta network on the query):
        q̂_0 = q_0;  q̂_i[d] = q_i[d] if |q_i[d] - q̂_{i-1}[d]| >= Θ else q̂_{i-1}[d]
        score_ij = s·q̂_i·k_j                 (only the changed coordinates cost work)
    variant "score" (the delta on the scores themselves):
        score_ij = score_{i-1,j} if |s·q_i·k_j - score_{i-1,j}| < Θ else s·q_i·k_j
        (score_{i-1,j} of a key that just left the window is exact)

    out_i = softmax_j(score_ij) v       over j <= a_i

``Θ = 0`` or ``w >= Lk`` is exact causal attention. The recurrence runs over the call's queries in
order, starting fresh at the first one (``q̂_0 = q_0``; no previous scores) unless ``state=`` carries
it over from an earlier call: ``DeltaState`` holds the reference query (``"query"``) or the last
row's scores (``"score"``), the position reached and the zero counts of the deltas (``sparsity``:
the share of delta entries below the threshold, the paper's reported sparsity). Decoding through
``ak.nn.Attention`` keeps one ``DeltaState`` per layer (with the keys and values), so stepping
equals the forward. The float64 recurrence decides which entries update, so float32 and float64
calls on the same values agree.

Forms: ``chunked`` — the recurrence first (which row each reference entry comes from), then the
scores in chunks of query rows; ``recurrent`` — one query at a time (the decoding form). The
``"score"`` variant keeps an ``Lq x Lk`` index table (O(L²) memory).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ...call import CAUSAL_PATTERNS, AttentionCall
from ...errors import OptionError
from ...options import Option
from ...registry import Method, MethodInfo, options, register
from ..linear.base import FormEngine
from ._common import expand_heads, masked_attention, work_dtype

SCORE_BUDGET = 1 << 24  # elements of one chunk of scores


@dataclass
class DeltaState:
    """What DeltaLLM carries from one call (or decode step) to the next, per batch and query head.

    ``reference (B, H, D)``: the reference query q̂ of the last row (variant ``"query"``);
    ``scores (B, H, T)``: the last row's scores over its ``T`` keys (variant ``"score"``);
    ``position``: the next query's key position (tokens processed); ``zeros`` / ``entries``:
    delta entries below the threshold / all delta entries so far. ``key``/``value``: the decode
    cache when the state belongs to an ``ak.nn.Attention`` layer (None for functional calls,
    where the caller passes the keys)."""

    reference: torch.Tensor | None = None
    scores: torch.Tensor | None = None
    position: int = 0
    zeros: int = 0
    entries: int = 0
    key: torch.Tensor | None = None
    value: torch.Tensor | None = None

    @property
    def sparsity(self) -> float:
        """Share of delta entries skipped (below the threshold)."""
        return self.zeros / self.entries if self.entries else 0.0


def _inputs(call: AttentionCall):
    wd = work_dtype(call.dtype)
    return (call.query.to(wd), expand_heads(call.key.to(wd), call.heads),
            expand_heads(call.value.to(wd), call.heads))


def _positions(call: AttentionCall) -> torch.Tensor:
    return torch.arange(call.q_len, device=call.device) + (call.k_len - call.q_len)


def _check_state(call: AttentionCall, state: DeltaState | None) -> None:
    if state is None or (state.reference is None and state.scores is None):
        return
    held = "query" if state.reference is not None else "score"
    if held != call.options["variant"]:
        raise OptionError(f"method 'deltallm': the state holds a {held!r}-variant recurrence but this call asks "
                          f"for variant={call.options['variant']!r}; use one DeltaState per variant.")
    first = call.k_len - call.q_len
    if state.position != first:
        raise OptionError(
            f"method 'deltallm': the state was left at position {state.position} but this call's first "
            f"query sits at key position {first} (Lk - Lq = {call.k_len} - {call.q_len}); pass the whole "
            "key/value history with the new queries, or a fresh DeltaState().")


# -- the recurrence: which row supplies each reference entry ------------------------------------
def query_sources(q64, threshold: float, start: torch.Tensor | None):
    """``src (B, H, Lq, D)``: the query row whose coordinate d is q̂_i[d] (-1: ``start``, the state's
    reference), the final reference and the count of entries below the threshold."""
    B, H, L, D = q64.shape
    src = torch.empty(B, H, L, D, dtype=torch.long, device=q64.device)
    ref, ref_src, zeros = start, None, torch.zeros((), dtype=torch.long, device=q64.device)
    if ref is not None:
        ref_src = torch.full((B, H, D), -1, dtype=torch.long, device=q64.device)
    for i in range(L):
        if ref is None:
            ref, ref_src = q64[:, :, i].clone(), torch.zeros(B, H, D, dtype=torch.long, device=q64.device)
        else:
            update = (q64[:, :, i] - ref).abs() >= threshold
            zeros += (~update).sum()
            ref = torch.where(update, q64[:, :, i], ref)
            ref_src = torch.where(update, torch.full_like(ref_src, i), ref_src)
        src[:, :, i] = ref_src
    return src, ref, int(zeros)


def score_sources(s64, pos, window: int, threshold: float, start: torch.Tensor | None):
    """``src (B, H, Lq, Lk)``: the query row whose exact score each approximate score is (-1: the
    state's scores ``start (B, H, T)``), the last row's scores and the count of reused far scores."""
    B, H, L, Lk = s64.shape
    src = torch.empty(B, H, L, Lk, dtype=torch.long, device=s64.device)
    keys = torch.arange(Lk, device=s64.device)
    prev, prev_src, zeros = None, None, torch.zeros((), dtype=torch.long, device=s64.device)
    if start is not None:
        prev = torch.nn.functional.pad(start, (0, Lk - start.shape[-1]))
        prev_src = torch.full((B, H, Lk), -1, dtype=torch.long, device=s64.device)
    for i in range(L):
        row = torch.full((B, H, Lk), i, dtype=torch.long, device=s64.device)
        if prev is None:
            prev, prev_src = s64[:, :, i].clone(), row
        else:
            far = keys <= pos[i] - window
            keep = far & ((s64[:, :, i] - prev).abs() < threshold)
            zeros += keep.sum()
            prev = torch.where(keep, prev, s64[:, :, i])
            prev_src = torch.where(keep, prev_src, row)
        src[:, :, i] = prev_src
    return src, prev, int(zeros)


def _far_entries(pos, window: int, first_fresh: bool, lk: int, per_row: int) -> int:
    """Delta entries counted for the sparsity statistic (rows after the first)."""
    rows = pos[1:] if first_fresh else pos
    if per_row:
        return per_row * len(rows)
    return int(torch.clamp(rows - window + 1, min=0, max=lk).sum())


# -- chunked form --------------------------------------------------------------------------------
def chunked(call: AttentionCall) -> torch.Tensor:
    o, state = call.options, call.options["state"]
    _check_state(call, state)
    q, k, v = _inputs(call)
    pos, w, theta, s = _positions(call), o["window"], o["threshold"], call.scale
    keys = torch.arange(call.k_len, device=call.device)
    visible = keys[None, :] <= pos[:, None]
    window = keys[None, :] > (pos[:, None] - w)
    fresh = state is None or (state.reference is None and state.scores is None)
    if o["variant"] == "query":
        start = None if fresh else state.reference.to(torch.float64)
        src, last, zeros = query_sources(q.detach().double(), theta, start)
        qhat = torch.gather(q, 2, src.clamp(min=0))
        if not fresh:
            qhat = torch.where(src >= 0, qhat, state.reference.to(q.dtype)[:, :, None])
        rows = max(1, SCORE_BUDGET // max(1, call.batch * call.heads * call.k_len))
        outs = []
        for r0 in range(0, call.q_len, rows):
            r1 = min(call.q_len, r0 + rows)
            sc = torch.where(window[r0:r1], q[:, :, r0:r1] @ k.transpose(-1, -2),
                             qhat[:, :, r0:r1] @ k.transpose(-1, -2)) * s
            outs.append(masked_attention(sc, visible[r0:r1], v)[0])
        out = torch.cat(outs, 2)
        per_row = call.head_dim * call.batch * call.heads
        if state is not None:
            state.reference = last.to(q.dtype).detach()
    else:
        exact = (q @ k.transpose(-1, -2)) * s
        s64 = (q.detach().double() @ k.detach().double().transpose(-1, -2)) * s
        start = None if fresh else state.scores.double()
        src, last, zeros = score_sources(s64, pos, w, theta, start)
        sc = torch.gather(exact, 2, src.clamp(min=0))
        if not fresh:
            held = torch.nn.functional.pad(state.scores.to(sc.dtype), (0, call.k_len - state.scores.shape[-1]))
            sc = torch.where(src >= 0, sc, held[:, :, None])
        out = masked_attention(sc, visible, v)[0]
        per_row = 0
        if state is not None:
            state.scores = last[..., : int(pos[-1]) + 1].to(q.dtype).detach()
    if state is not None:
        count = _far_entries(pos, w, fresh, call.k_len, per_row)
        state.zeros += zeros
        state.entries += count * (1 if per_row else call.batch * call.heads)
        state.position = int(pos[-1]) + 1
    return out.to(call.dtype)


# -- recurrent form (the decoding form) ------------------------------------------------------------
def advance(state: DeltaState, q, k, v, pos, scale: float, options) -> torch.Tensor:
    """Outputs of queries ``q (B, H, n, D)`` at key positions ``pos (n,)`` over ``k, v (B, H, Lk, ·)``,
    one query at a time from ``state`` (updated in place)."""
    w, theta, variant = options["window"], options["threshold"], options["variant"]
    keys = torch.arange(k.shape[2], device=q.device)
    outs = []
    for i in range(q.shape[2]):
        qi, a = q[:, :, i], int(pos[i])
        exact = (qi[:, :, None, :] @ k.transpose(-1, -2)).squeeze(-2) * scale  # (B, H, Lk)
        far = keys <= a - w
        if variant == "query":
            if state.reference is None:
                ref = qi
            else:
                update = (qi.detach().double() - state.reference.detach().double()).abs() >= theta
                state.zeros += int((~update).sum())
                state.entries += update.numel()
                ref = torch.where(update, qi, state.reference.to(qi.dtype))
            state.reference = ref
            sc = torch.where(far, (ref[:, :, None, :] @ k.transpose(-1, -2)).squeeze(-2) * scale, exact)
        else:
            sc = exact
            if state.scores is not None:
                prev = torch.nn.functional.pad(state.scores.to(exact.dtype), (0, k.shape[2] - state.scores.shape[-1]))
                keep = far & ((exact.detach().double() - prev.detach().double()).abs() < theta)
                state.zeros += int(keep.sum())
                state.entries += int(far.sum()) * keep.shape[0] * keep.shape[1]
                sc = torch.where(keep, prev, exact)
            state.scores = sc[..., : a + 1]
        outs.append(masked_attention(sc[:, :, None], (keys <= a)[None], v)[0])
        state.position = a + 1
    return torch.cat(outs, 2)


def recurrent(call: AttentionCall) -> torch.Tensor:
    state = call.options["state"]
    _check_state(call, state)
    q, k, v = _inputs(call)
    run = DeltaState() if state is None else state
    out = advance(run, q, k, v, _positions(call), call.scale, call.options)
    for name in ("reference", "scores"):
        t = getattr(run, name)
        setattr(run, name, None if t is None else t.detach())
    return out.to(call.dtype)


# -- reference ---------------------------------------------------------------------------------
def reference(call: AttentionCall) -> torch.Tensor:
    """Row by row from the definition, in float64 (the state is read, never written)."""
    o, state = call.options, call.options["state"]
    q, k, v = (t.double() for t in _inputs(call))
    w, theta, s = o["window"], o["threshold"], call.scale
    out = torch.zeros(*q.shape[:3], v.shape[-1], dtype=torch.float64, device=q.device)
    ref = None if state is None or state.reference is None else state.reference.double()
    prev = None if state is None or state.scores is None else state.scores.double()
    for i in range(call.q_len):
        a = i + call.k_len - call.q_len
        exact = torch.einsum("bhd,bhjd->bhj", q[:, :, i], k) * s
        if o["variant"] == "query":
            ref = q[:, :, i] if ref is None else torch.where((q[:, :, i] - ref).abs() >= theta, q[:, :, i], ref)
            approx = torch.einsum("bhd,bhjd->bhj", ref, k) * s
        else:
            approx = exact
            if prev is not None:  # far keys keep the previous row's score unless it moved by >= Θ
                n = max(0, a - w + 1)
                stale = (exact[:, :, :n] - prev[:, :, :n]).abs() < theta
                approx = torch.cat([torch.where(stale, prev[:, :, :n], exact[:, :, :n]), exact[:, :, n:]], -1)
            prev = approx
        scores = torch.cat([approx[:, :, : max(0, a - w + 1)], exact[:, :, max(0, a - w + 1):]], -1)
        if a >= 0:
            p = torch.softmax(scores[:, :, : a + 1], -1)
            out[:, :, i] = torch.einsum("bhj,bhjd->bhd", p, v[:, :, : a + 1])
    return out.to(call.dtype)


_ENGINES = (FormEngine("chunked", chunked), FormEngine("recurrent", recurrent))


@register
class DeltaLLM(Method):
    info = MethodInfo(
        name="deltallm", family="A", kind="approximate", patterns=CAUSAL_PATTERNS, decode=True, seed=(47,),
        summary="DeltaLLM (reconstructed): exact attention in a local window, thresholded deltas of the "
                "query (or of the scores) from the previous token outside it",
        backends=tuple(e.name for e in _ENGINES), state_size="D (query) or Lk (score) + the kv cache",
        options=options(
            Option("window", "int", 64, "keys scored exactly, the query's own included (the local context "
                   "window; the paper tunes it per model, 64 is attnkit's default)", low=1),
            Option("threshold", "float", 0.1, "delta entries below it are skipped (0 = exact attention; the "
                   "paper tunes it per model, 0.1 is attnkit's default)", low=0.0),
            Option("variant", "choice", "query", "what the delta is taken of: 'query' (a delta network on "
                   "the query) or 'score' (on the scores outside the window)", choices=("query", "score")),
            Option("state", "object", None, "a DeltaState carried across calls (decoding outside ak.nn); "
                   "None: the recurrence starts at this call's first query", nullable=True)),
        references="Qi et al. 2025, DeltaLLM (arXiv 2507.19608; abstract only, no code: reconstructed)")

    def engines(self):
        return _ENGINES

    def validate(self, call):
        st = call.options["state"]
        if st is not None and not isinstance(st, DeltaState):
            raise OptionError(f"method 'deltallm': state must be a DeltaState (from "
                              f"attnkit.mechanisms.approx.deltallm), got {type(st).__name__}.")
        _check_state(call, st)

    def reference(self, call):
        return reference(call)

    def init_state(self, batch, heads, head_dim, value_dim, *, dtype, device, options):
        return DeltaState()

    def forward_state(self, call, state: DeltaState):
        q = call.query.to(work_dtype(call.dtype))
        k, v = (expand_heads(t.to(q.dtype), call.heads) for t in (call.key, call.value))
        state.key = k if state.key is None else torch.cat([state.key, k], 2)
        state.value = v if state.value is None else torch.cat([state.value, v], 2)
        pos = torch.arange(call.q_len, device=q.device) + state.key.shape[2] - call.q_len
        return advance(state, q, state.key, state.value, pos, call.scale, call.options).to(call.dtype), state

    def sample_options(self, rng, q_len, k_len):
        return {"window": int(rng.integers(1, 12)), "threshold": float(rng.choice([0.0, 0.3, 0.8, 1.5])),
                "variant": ["query", "score"][int(rng.integers(2))]}

    def bench_options(self, q_len, k_len, density=None):
        """Defaults (window 64, threshold 0.1, query deltas); with ``density``, a window of
        ``ceil(density * Lk)`` keys: the exactly scored pairs are about that share of ``Lq x Lk``
        (the rest are approximated, not dropped). ``density = 1``: exact causal attention."""
        if density is None:
            return {}
        return {"window": max(1, min(k_len, math.ceil(density * k_len - 1e-9)))}


__all__ = ["DeltaLLM", "DeltaState", "advance", "query_sources", "score_sources"]
