"""``combiner``: Combiner (Ren et al. 2021, arXiv 2107.05768), full attention through a
structured factorization: every query reaches a few keys directly and every other region
through one summary per region, in one softmax over both.

Shapes ``q (B, H, L, D)``, ``k, v (B, Hkv, L, ·)`` (self-attention) → ``(B, H, L, Dv)``.
Tokens are cut into segments (rows) of ``segment = Ls`` consecutive tokens; the last may be
shorter. ``s = scale``.

**Fixed** (``sqrt_fixed_full``), for segment ``σ(i) = i // Ls``, ``act``/``pool`` from
``local_summary = "act-pool"`` (act ∈ identity, relu; pool ∈ max, mean, sum over the segment's
tokens)::

    q̄_r  = pool_{t∈r} act(s·q_t)        k̄_r = pool_{t∈r} act(k_t)
    sv_r  = Σ_{t∈r} softmax_t(q̄_r·k_t) v_t                   (the segment's local expectation)
    direct  j ∈ σ(i)   (causal: j <= i)          logit s·q_i·k_j       value v_j
    summary r < σ(i)   (non-causal: every r)     logit s·q_i·k̄_r       value sv_r
    out_i = one softmax over direct + summary logits, applied to their values

**Axial** (``axial_rowmajor``), rows of ``Ls`` columns, token (r, l)::

    P_r[l, t]      = softmax_t(s·q_{r,l}·k_{r,t})   over the whole row r (no mask)
    row_out[r, l]  = Σ_t P_r[l, t] v_{r,t}
    key_row[r, l]  = Σ_t P_r[l, t] k_{r,t}  ('wsum')   or   k_{r,l}  ('none')
    direct  (r, t), t <= l if causal               logit s·q_{r,l}·k_{r,t}          value v_{r,t}
    summary (r', l), r' < r (non-causal: every r')  logit s·q_{r,l}·key_row[r', l]   value row_out[r', l]

Causal with ``segment = L`` is exact causal attention; so is ``segment = 1`` with an identity
summary (Fixed) or either row summary (Axial). Non-causal rows also see their own segment's (row's)
summary, so no segment length gives exact non-causal attention. Non-causal Axial needs ``L`` to
be a multiple of ``segment`` (a partial last row would leave columns without its summary).

Decoding (``decode=True``, through ``ak.nn.Attention``): ``CombinerState`` keeps the summaries of
completed segments (rows) and the queries, keys and values of the current one; a token's output
needs only those, so stepping equals the forward.

Confirmed in google-research ``combiner/combiner/tf/approx_attention.py`` (snapshot 5b09c22) and
``attention.py``: ``get_qkv`` multiplies the query by ``head_size**-0.5`` before pooling and every
dot product (so ``pool(act(s·q))``, keys unscaled); span values by a softmax over the segment's
keys with no mask; the causal local mask keeps ``j <= i`` and the summary mask ``r < σ(i)``
(``get_causal_mask(is_strict=True)``), non-causal summaries unmasked; one float32 softmax over
``[local, summaries]``; Axial's row softmax taken before the causal local mask is added, summaries
at the same column of earlier rows; defaults ``max_seg_len=128``, ``local_summary='identity-max'``
(``SqrtFixedFullLM``), ``row_summary='proj'`` (``AxialRowMajorLM``, learned: not offered here —
``wsum`` is the parameter-free one). Differences: a partial last segment is allowed where it
keeps full coverage (the official code asserts divisibility); ``deepset`` summaries and the
``axial_mixture`` variants are not implemented.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ...call import SELF_PATTERNS, AttentionCall
from ...errors import OptionError
from ...options import Option
from ...patterns.plan import cdiv
from ...registry import Method, MethodInfo, options, register
from ..linear.base import FormEngine
from ._common import expand_heads, work_dtype

LOCAL_SUMMARIES = tuple(f"{a}-{p}" for a in ("identity", "relu") for p in ("max", "mean", "sum"))
ROW_SUMMARIES = ("wsum", "none")
NEG = float("-inf")


def pool_summary(x: torch.Tensor, valid: torch.Tensor, kind: str) -> torch.Tensor:
    """``pool_t act(x_t)`` over dim -2 of ``x (..., n, D)``, only where ``valid (..., n)``."""
    act, pool = kind.split("-")
    if act == "relu":
        x = torch.relu(x)
    valid = valid[..., None]
    if pool == "max":
        return x.masked_fill(~valid, NEG).amax(-2)
    total = (x * valid).sum(-2)
    return total / valid.sum(-2).clamp(min=1) if pool == "mean" else total


def joint_softmax(local, local_v, summ, summ_v):
    """One softmax over ``[local (..., Lk), summ (..., R)]`` logits (``-inf`` = hidden), applied to
    ``local_v (..., Lk, Dv)`` and ``summ_v (..., R, Dv)`` (both broadcast like matmul operands)."""
    logits = torch.cat([local, summ], -1)
    m = logits.amax(-1, keepdim=True).detach()
    w = torch.exp(logits - torch.where(torch.isfinite(m), m, torch.zeros_like(m)))
    w = w / w.sum(-1, keepdim=True)
    n = local.shape[-1]
    return w[..., :n] @ local_v + w[..., n:] @ summ_v


def fixed_summaries(q, k, v, valid, scale: float, kind: str):
    """Summary keys ``k̄ (..., D)`` and values ``sv (..., Dv)`` of segments ``q, k, v (..., seg, ·)``
    whose tokens are ``valid (..., seg)``."""
    qbar = pool_summary(q * scale, valid, kind)
    kbar = pool_summary(k, valid, kind)
    logits = (qbar[..., None, :] @ k.transpose(-1, -2)).squeeze(-2).masked_fill(~valid, NEG)
    return kbar, (torch.softmax(logits, -1)[..., None, :] @ v).squeeze(-2)


def row_summaries(q, k, v, valid, scale: float, kind: str):
    """Axial summaries of rows ``q, k, v (..., Ls, ·)``: ``key_row (..., Ls, D)``, ``row_out
    (..., Ls, Dv)`` (each column's full-row attention)."""
    p = torch.softmax((q @ k.transpose(-1, -2) * scale).masked_fill(~valid[..., None, :], NEG), -1)
    return (p @ k if kind == "wsum" else k), p @ v


def _segments(x: torch.Tensor, seg: int) -> torch.Tensor:
    """``x (B, H, L, D)`` zero-padded and viewed ``(B, H, n, seg, D)``."""
    B, H, L, D = x.shape
    n = cdiv(L, seg)
    return torch.nn.functional.pad(x, (0, 0, 0, n * seg - L)).view(B, H, n, seg, D)


def _inputs(call: AttentionCall):
    wd = work_dtype(call.dtype)
    return (call.query.to(wd), expand_heads(call.key.to(wd), call.heads),
            expand_heads(call.value.to(wd), call.heads))


def _summary_kind(options) -> str:
    if options["factorization"] == "fixed":
        return options["local_summary"] or "identity-max"
    return options["row_summary"] or "wsum"


# -- fast forms (all segments at once) ----------------------------------------------------------
def factorized(call: AttentionCall) -> torch.Tensor:
    q, k, v = _inputs(call)
    seg, s, L = call.options["segment"], call.scale, call.q_len
    qs, ks, vs = (_segments(t, seg) for t in (q, k, v))
    n, dev = qs.shape[2], q.device
    valid = (torch.arange(n * seg, device=dev) < L).view(n, seg)
    local = (qs @ ks.transpose(-1, -2)) * s  # (B, H, n, seg, seg)
    keep = valid[:, None, :]
    if call.is_causal:
        keep = keep & torch.ones(seg, seg, dtype=torch.bool, device=dev).tril()
    rows = torch.arange(n, device=dev)
    if call.options["factorization"] == "fixed":
        kbar, sv = fixed_summaries(qs, ks, vs, valid, s, _summary_kind(call.options))  # (B, H, n, ·)
        summ = torch.einsum("bhnid,bhrd->bhnir", qs, kbar) * s
        if call.is_causal:
            summ = summ.masked_fill(~(rows[None, :] < rows[:, None])[:, None, :], NEG)
        out = joint_softmax(local.masked_fill(~keep, NEG), vs, summ, sv[:, :, None])
    else:
        key_row, row_out = row_summaries(qs, ks, vs, valid, s, _summary_kind(call.options))
        summ = torch.einsum("bhrld,bhpld->bhrlp", qs, key_row) * s  # (B, H, n, seg, n)
        if call.is_causal:
            summ = summ.masked_fill(~(rows[None, :] < rows[:, None])[:, None, :], NEG)
        w_local = local.masked_fill(~keep, NEG)
        out = _axial_joint(w_local, vs, summ, row_out)
    return out.reshape(q.shape[0], q.shape[1], n * seg, -1)[:, :, :L].to(call.dtype)


def _axial_joint(local, vs, summ, row_out):
    """Axial softmax: ``local (B,H,n,Ls,Ls)`` over the row's values ``vs (B,H,n,Ls,Dv)``,
    ``summ (B,H,n,Ls,n)`` over ``row_out (B,H,n,Ls,Dv)`` at the query's column."""
    logits = torch.cat([local, summ], -1)
    m = logits.amax(-1, keepdim=True).detach()
    w = torch.exp(logits - torch.where(torch.isfinite(m), m, torch.zeros_like(m)))
    w = w / w.sum(-1, keepdim=True)
    seg = local.shape[-1]
    return w[..., :seg] @ vs + torch.einsum("bhrlp,bhpld->bhrld", w[..., seg:], row_out)


# -- decoding state (also a form: one segment at a time) ----------------------------------------
@dataclass
class CombinerState:
    """One layer's decode state, per batch element and (query) head.

    ``keys (B, H, n, D)`` / ``values (B, H, n, Dv)``: summaries of the ``n`` completed segments
    (Axial: ``(B, H, n, Ls, ·)``, one per column); ``query``, ``key``, ``value`` ``(B, H, t, ·)``:
    the ``t < Ls`` tokens of the current segment; ``length``: tokens seen."""

    keys: torch.Tensor | None = None
    values: torch.Tensor | None = None
    query: torch.Tensor | None = None
    key: torch.Tensor | None = None
    value: torch.Tensor | None = None
    length: int = 0


def _cat(a, b):
    return b if a is None else torch.cat([a, b], 2)


def _segment_outputs(state: CombinerState, q, have: int, scale: float, axial: bool) -> torch.Tensor:
    """Causal outputs of queries ``q (B, H, n, D)`` at positions ``have ...`` of the current
    segment: its keys so far directly, the completed segments through their summaries."""
    n, t = q.shape[2], state.key.shape[2]
    local = (q @ state.key.transpose(-1, -2)) * scale  # (B, H, n, t)
    visible = torch.arange(t, device=q.device)[None, :] <= torch.arange(have, have + n, device=q.device)[:, None]
    local = local.masked_fill(~visible, NEG)
    if axial:  # the completed rows' summaries at each query's column: (B, H, n, rows, ·)
        cols = torch.arange(have, have + n, device=q.device)
        keys, values = state.keys[:, :, :, cols].transpose(2, 3), state.values[:, :, :, cols].transpose(2, 3)
        summ = torch.einsum("bhnd,bhnrd->bhnr", q, keys) * scale
        w = torch.softmax(torch.cat([local, summ], -1), -1)
        return w[..., :t] @ state.value + torch.einsum("bhnr,bhnrd->bhnd", w[..., t:], values)
    return joint_softmax(local, state.value, q @ state.keys.transpose(-1, -2) * scale, state.values)


def advance(state: CombinerState, q, k, v, scale: float, options) -> torch.Tensor:
    """Causal outputs ``(B, H, n, Dv)`` of ``n`` new tokens ``q, k, v (B, H, n, ·)``; updates ``state``."""
    seg, axial, kind = options["segment"], options["factorization"] == "axial", _summary_kind(options)
    B, H = q.shape[:2]
    if state.keys is None:  # no completed segment yet
        shape = (B, H, 0, seg) if axial else (B, H, 0)
        state.keys, state.values = q.new_zeros(*shape, q.shape[-1]), v.new_zeros(*shape, v.shape[-1])
    outs, i = [], 0
    while i < q.shape[2]:
        have = 0 if state.key is None else state.key.shape[2]
        take = min(seg - have, q.shape[2] - i)
        state.query = _cat(state.query, q[:, :, i:i + take])
        state.key, state.value = _cat(state.key, k[:, :, i:i + take]), _cat(state.value, v[:, :, i:i + take])
        outs.append(_segment_outputs(state, q[:, :, i:i + take], have, scale, axial))
        if have + take == seg:  # the segment is complete: keep its summaries only
            valid = torch.ones(seg, dtype=torch.bool, device=q.device)
            summarize = row_summaries if axial else fixed_summaries
            kb, vb = summarize(state.query, state.key, state.value, valid, scale, kind)
            state.keys, state.values = _cat(state.keys, kb.unsqueeze(2)), _cat(state.values, vb.unsqueeze(2))
            state.query = state.key = state.value = None
        i += take
    state.length += q.shape[2]
    return torch.cat(outs, 2)


def segmentwise(call: AttentionCall) -> torch.Tensor:
    """The decoding form on the whole call: segments one after another (causal only)."""
    q, k, v = _inputs(call)
    return advance(CombinerState(), q, k, v, call.scale, call.options).to(call.dtype)


def _segmentwise_can_run(call: AttentionCall) -> str | None:
    return None if call.is_causal else "the segment-by-segment (decoding) form is causal only"


# -- reference: the joint softmax written per query --------------------------------------------
def reference(call: AttentionCall) -> torch.Tensor:
    """Loops over queries; each segment's (row's) summaries computed from their definitions."""
    q, k, v = (t.double() for t in _inputs(call))
    o = call.options
    seg, s, L, kind = o["segment"], call.scale, call.q_len, _summary_kind(o)
    spans = [list(range(r, min(L, r + seg))) for r in range(0, L, seg)]
    summaries = []  # per segment: (key, value); Axial: per column of the row
    for idx in spans:
        valid = torch.ones(len(idx), dtype=torch.bool, device=q.device)
        if o["factorization"] == "fixed":
            summaries.append(fixed_summaries(q[:, :, idx], k[:, :, idx], v[:, :, idx], valid, s, kind))
        else:
            summaries.append(row_summaries(q[:, :, idx], k[:, :, idx], v[:, :, idx], valid, s, kind))
    out = torch.zeros(*q.shape[:3], v.shape[-1], dtype=torch.float64, device=q.device)
    for i in range(L):
        r, col = divmod(i, seg)
        direct = [j for j in spans[r] if not call.is_causal or j <= i]
        logits = [(q[:, :, i] * k[:, :, j]).sum(-1) * s for j in direct]
        values = [v[:, :, j] for j in direct]
        for r2 in (range(r) if call.is_causal else range(len(spans))):
            kb, sv = summaries[r2]
            if o["factorization"] == "axial":  # the summary at the query's column
                kb, sv = kb[:, :, col], sv[:, :, col]
            logits.append((q[:, :, i] * kb).sum(-1) * s)
            values.append(sv)
        w = torch.softmax(torch.stack(logits, -1), -1)
        out[:, :, i] = (w[..., None] * torch.stack(values, -2)).sum(-2)
    return out.to(call.dtype)


_ENGINES = (FormEngine("factorized", factorized), FormEngine("segmentwise", segmentwise, _segmentwise_can_run))


@register
class Combiner(Method):
    info = MethodInfo(
        name="combiner", family="A", kind="approximate", patterns=SELF_PATTERNS, decode=True, seed=(51,),
        summary="Combiner: direct attention within a segment + one summary per other segment "
                "(Fixed) or per earlier row at the same column (Axial), one softmax",
        backends=tuple(e.name for e in _ENGINES), state_size="(L/segment)*(D+Dv) + segment*(2D+Dv)",
        options=options(
            Option("factorization", "choice", "fixed", "'fixed' (sqrt_fixed_full: segment summaries) or "
                   "'axial' (axial_rowmajor: row summaries per column)", choices=("fixed", "axial")),
            Option("segment", "int", 128, "tokens per segment / row (official max_seg_len)", low=1),
            Option("local_summary", "choice", None, "Fixed: activation-pooling of a segment's summary "
                   "query and key (None: 'identity-max')", choices=LOCAL_SUMMARIES, nullable=True),
            Option("row_summary", "choice", None, "Axial: summary key of a row column, 'wsum' (the row "
                   "attention's weighted sum of keys) or 'none' (the column's own key); None: 'wsum'",
                   choices=ROW_SUMMARIES, nullable=True)),
        references="Ren et al. 2021, Combiner (arXiv 2107.05768); github.com/google-research/"
                   "google-research combiner/combiner/tf/approx_attention.py")

    def engines(self):
        return _ENGINES

    def validate(self, call):
        o = call.options
        other = "row_summary" if o["factorization"] == "fixed" else "local_summary"
        if o[other] is not None:
            raise OptionError(f"method 'combiner': {other}={o[other]!r} does not apply to "
                              f"factorization={o['factorization']!r}; drop it (local_summary is for "
                              "'fixed', row_summary for 'axial').")
        if o["factorization"] == "axial" and not call.is_causal and call.q_len % o["segment"]:
            raise OptionError(
                f"method 'combiner': factorization='axial' non-causal needs the length to be a multiple of "
                f"segment, got L={call.q_len}, segment={o['segment']} (a partial last row has no summary "
                f"for columns >= {call.q_len % o['segment']}). Use a segment dividing {call.q_len}, or pad.")

    def reference(self, call):
        return reference(call)

    def init_state(self, batch, heads, head_dim, value_dim, *, dtype, device, options):
        return CombinerState()

    def forward_state(self, call, state: CombinerState):
        q, k, v = _inputs(call)
        return advance(state, q, k, v, call.scale, call.options).to(call.dtype), state

    def sample_options(self, rng, q_len, k_len):
        if rng.random() < 0.5:
            return {"segment": int(rng.integers(1, 12)),
                    "local_summary": [None, *LOCAL_SUMMARIES][int(rng.integers(len(LOCAL_SUMMARIES) + 1))]}
        divisors = [d for d in range(1, q_len + 1) if q_len % d == 0]
        return {"factorization": "axial", "segment": int(rng.choice(divisors)),
                "row_summary": [None, *ROW_SUMMARIES][int(rng.integers(3))]}

    def bench_options(self, q_len, k_len, density=None):
        """The paper's LM configuration (Fixed, segment 128, identity-max) without ``density``; with
        it, ``segment = ceil(density * L)`` tokens, so the directly attended pairs are about that
        share of ``L x L`` (their share of the causal half: ``segment = ceil(2 * density * L)`` would
        be the causal reading; the benchmark reports the density reached). ``density = 1``: one
        segment, exact causal attention."""
        if density is None:
            return {}
        return {"segment": max(1, min(k_len, math.ceil(density * k_len - 1e-9)))}


__all__ = ["Combiner", "CombinerState", "advance", "fixed_summaries", "row_summaries"]
