"""``flow``: Flow-Attention of Flowformer (Wu et al., ICML 2022, arXiv 2202.06258): linear
attention with flow conservation, source competition and sink allocation.

With ``phi = sigmoid``, ``Qp = phi(Q) (L, D)``, ``Kp = phi(K) (S, D)`` and ``eps`` added to the
*vectors* before each dot product (as the official code does):

    noncausal:  I  = 1 / ((Qp + eps) . (sum_s Kp + eps))                 incoming flow of each sink
                O  = 1 / ((Kp + eps) . (sum_l Qp + eps))                 outgoing flow of each source
                Ic = (Qp + eps) . (sum_s Kp * O + eps)                   conserved incoming flow
                Oc = clamp((Kp + eps) . (sum_l Qp * I + eps), -c, c)     conserved outgoing flow
                out = sigmoid(Ic * L/S) * ((Qp * I) @ (Kp^T @ (V * softmax_S(Oc) * S)))
    causal (self, n_i = i + 1, every sum a prefix sum up to the position):
                I  = n / ((Qp + eps) . (cumsum Kp + eps)),   O = n / ((Kp + eps) . (cumsum Qp + eps))
                Ic = (Qp + eps) . (cumsum(Kp * O) + eps) / n
                Oc = clamp((Kp + eps) . (cumsum(Qp * I) + eps) / n, -c, c)
                comp_j = exp(Oc_j) / sum_{j' <= j} exp(Oc_j') * n_j      (normalized over keys <= j)
                out_i = sigmoid(Ic_i) * (Qp_i * I_i / n_i) . sum_{j <= i} Kp_j^T (V_j * comp_j)

Every quantity of position i uses only queries and keys at positions <= i: nothing leaks from the
future (the competition of key j is normalized over keys <= j, exactly as in the official code).
The output is linear in V: ``out = diag(alloc * I') (Qp Kp^T masked) diag(comp) V`` (``materialize``).

``scale``: the sigmoid feature map has no temperature; Flow-Attention takes no ``scale`` (leave it
None; another value raises). ``clamp`` is 1.0 in the core ``Flow_Attention.py``; the fairseq
language-model version (``Flowformer_NLP``) uses 5.0.

Forms (backends): ``chunked`` — prefix sums (cumsum, O(L D)) for the flows, then a chunked causal
linear attention on ``q' = Qp I / n``, ``k' = Kp``, ``v' = V comp``, gated by the allocation;
``parallel`` — prefix sums as triangular matrix products and the explicit ``L x L`` map;
``recurrent`` — one token at a time with the state ``(n, sum Qp, sum Kp, sum Kp O, sum Qp I,
sum exp(Oc), sum Kp^T V comp)``. Patterns: causal self (official ``Flow_Attention_Causal``),
noncausal self and cross (official ``Flow_Attention``, with the ``L/S`` factor). Causal cross is
not defined by the paper (the flows count positions of one sequence) and is refused.

Confirmed in thuml/Flowformer (snapshot 2024-07-18): ``Flow_Attention.py`` (``Flow_Attention``,
``Flow_Attention_Causal``: sigmoid kernel, eps 1e-6 on vectors, ``normal = arange(L) + 1``,
clamp(-1, 1), ``exp(Oc) / cumsum(exp(Oc)) * normal``, ``q * sink_incoming / normal``, output
dropout 0.05 in the module), ``Flowformer_NLP/flow_attention.py`` (same causal form, clamp ±5).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...call import AttentionCall
from ...errors import ArgumentError
from ...options import Option
from ...registry import MethodInfo, options, register
from ._gla import lower
from .base import CHUNK_SIZE, RecurrentMethod, three_forms
from .linear import chunked_causal


@dataclass
class FlowState:
    """Prefix sums of a causal Flow-Attention after ``n`` tokens (all ``(B, H, ...)``)."""

    n: int
    q_sum: torch.Tensor       # sum Qp            (B, H, D)
    k_sum: torch.Tensor       # sum Kp            (B, H, D)
    ko_sum: torch.Tensor      # sum Kp * O        (B, H, D)
    qi_sum: torch.Tensor      # sum Qp * I        (B, H, D)
    e_sum: torch.Tensor       # sum exp(Oc)       (B, H)
    kv: torch.Tensor          # sum Kp^T V comp   (B, H, D, Dv)


def _inputs(call: AttentionCall):
    wd = call.dtype if call.dtype == torch.float64 else torch.float32
    k, v = call.expanded_kv()
    return torch.sigmoid(call.query.to(wd)), torch.sigmoid(k.to(wd)), v.to(wd)


def _dot(a, b, eps):
    return ((a + eps) * (b + eps)).sum(-1)


# -- noncausal (one pass over the sequence) -----------------------------------------------------
def _noncausal_factors(qp, kp, call):
    """``(q', comp, alloc)`` with ``out = alloc * (q' @ (Kp^T @ (V * comp)))``."""
    eps, L, S = call.options["eps"], call.q_len, call.k_len
    I = 1.0 / _dot(qp, kp.sum(2, keepdim=True), eps)
    O = 1.0 / _dot(kp, qp.sum(2, keepdim=True), eps)
    Ic = _dot(qp, (kp * O[..., None]).sum(2, keepdim=True), eps)
    Oc = _dot(kp, (qp * I[..., None]).sum(2, keepdim=True), eps).clamp(-call.options["clamp"],
                                                                         call.options["clamp"])
    return qp * I[..., None], torch.softmax(Oc, -1) * S, torch.sigmoid(Ic * (L / S))


# -- causal: flows from prefix sums --------------------------------------------------------------
def _cumsum(x):
    return torch.cumsum(x, 2)


def _causal_factors(qp, kp, call, state: FlowState | None = None, prefix=_cumsum):
    """Per-position ``(q', comp, alloc)`` of the causal form, continuing from ``state``; ``prefix``
    is the inclusive prefix sum along dim 2 (cumsum, or a triangular matmul in the parallel form).
    Also returns the sums after the last position."""
    eps, c = call.options["eps"], call.options["clamp"]
    L = qp.shape[2]
    n0 = state.n if state else 0
    n = torch.arange(n0 + 1, n0 + L + 1, dtype=qp.dtype, device=qp.device)
    start = (lambda t, name: getattr(state, name)[:, :, None]) if state else (lambda t, name: 0)
    q_sum = prefix(qp) + start(qp, "q_sum")
    k_sum = prefix(kp) + start(kp, "k_sum")
    I = n / _dot(qp, k_sum, eps)
    O = n / _dot(kp, q_sum, eps)
    ko_sum = prefix(kp * O[..., None]) + start(kp, "ko_sum")
    qi_sum = prefix(qp * I[..., None]) + start(qp, "qi_sum")
    Ic = _dot(qp, ko_sum, eps) / n
    Oc = (_dot(kp, qi_sum, eps) / n).clamp(-c, c)
    e = torch.exp(Oc)
    e_sum = prefix(e[..., None])[..., 0] + (state.e_sum[:, :, None] if state else 0)
    comp = e / e_sum * n
    sums = dict(n=n0 + L, q_sum=q_sum[:, :, -1], k_sum=k_sum[:, :, -1], ko_sum=ko_sum[:, :, -1],
                qi_sum=qi_sum[:, :, -1], e_sum=e_sum[:, :, -1])
    return qp * (I / n)[..., None], comp, torch.sigmoid(Ic), sums


def _tril_prefix(x):
    return lower(x.shape[2], x.device).to(x.dtype) @ x


def weights(call: AttentionCall) -> torch.Tensor:
    """``(B, H, Lq, Lk)``: ``diag(alloc) (q' Kp^T masked) diag(comp)``; ``W @ v`` is the output."""
    qp, kp, _ = _inputs(call)
    if call.is_causal:
        qs, comp, alloc, _ = _causal_factors(qp, kp, call, prefix=_tril_prefix)
        a = (qs @ kp.transpose(-1, -2)) * lower(call.q_len, qp.device)
    else:
        qs, comp, alloc = _noncausal_factors(qp, kp, call)
        a = qs @ kp.transpose(-1, -2)
    return alloc[..., None] * a * comp[:, :, None, :]


def parallel(call: AttentionCall) -> torch.Tensor:
    return (weights(call) @ _inputs(call)[2]).to(call.dtype)


def chunked(call: AttentionCall) -> torch.Tensor:
    qp, kp, v = _inputs(call)
    if not call.is_causal:
        qs, comp, alloc = _noncausal_factors(qp, kp, call)
        out = alloc[..., None] * (qs @ (kp.transpose(-1, -2) @ (v * comp[..., None])))
        return out.to(call.dtype)
    return _causal_chunked(qp, kp, v, call, None)[0].to(call.dtype)


def _causal_chunked(qp, kp, v, call, state: FlowState | None):
    qs, comp, alloc, sums = _causal_factors(qp, kp, call, state)
    vc = v * comp[..., None]
    B, H, _, D = qp.shape
    kv0 = state.kv if state else qp.new_zeros(B, H, D, v.shape[-1])
    num, _, kv, _ = chunked_causal(qs, kp, vc, kv0, qp.new_zeros(B, H, D), call.options["chunk_size"])
    return alloc[..., None] * num, FlowState(kv=kv, **sums)


def recurrent(call: AttentionCall) -> torch.Tensor:
    qp, kp, v = _inputs(call)
    B, H, L, D = qp.shape
    eps, c = call.options["eps"], call.options["clamp"]
    if not call.is_causal:
        sq, sk = qp.new_zeros(B, H, D), qp.new_zeros(B, H, D)
        for t in range(L):
            sq = sq + qp[:, :, t]
        for s in range(call.k_len):
            sk = sk + kp[:, :, s]
        I = 1.0 / _dot(qp, sk[:, :, None], eps)
        O = 1.0 / _dot(kp, sq[:, :, None], eps)
        sko, sqi = qp.new_zeros(B, H, D), qp.new_zeros(B, H, D)
        for s in range(call.k_len):
            sko = sko + kp[:, :, s] * O[:, :, s, None]
        for t in range(L):
            sqi = sqi + qp[:, :, t] * I[:, :, t, None]
        Ic = _dot(qp, sko[:, :, None], eps)
        Oc = _dot(kp, sqi[:, :, None], eps).clamp(-c, c)
        e = torch.exp(Oc - Oc.amax(-1, keepdim=True))
        comp = e / e.sum(-1, keepdim=True) * call.k_len
        kv = qp.new_zeros(B, H, D, v.shape[-1])
        for s in range(call.k_len):
            kv = kv + kp[:, :, s, :, None] * (v[:, :, s] * comp[:, :, s, None])[:, :, None, :]
        out = torch.sigmoid(Ic * (L / call.k_len))[..., None] * ((qp * I[..., None]) @ kv)
        return out.to(call.dtype)
    out, _ = recurrent_causal(qp, kp, v, call, None)
    return out.to(call.dtype)


def recurrent_causal(qp, kp, v, call, state: FlowState | None):
    B, H, L, D = qp.shape
    eps, c = call.options["eps"], call.options["clamp"]
    z = qp.new_zeros(B, H, D)
    st = state or FlowState(0, z, z, z, z, qp.new_zeros(B, H), qp.new_zeros(B, H, D, v.shape[-1]))
    n, sq, sk, sko, sqi, se, kv = st.n, st.q_sum, st.k_sum, st.ko_sum, st.qi_sum, st.e_sum, st.kv
    outs = []
    for t in range(L):
        n += 1
        q, k = qp[:, :, t], kp[:, :, t]
        sq, sk = sq + q, sk + k
        I, O = n / _dot(q, sk, eps), n / _dot(k, sq, eps)
        sko, sqi = sko + k * O[..., None], sqi + q * I[..., None]
        Ic = _dot(q, sko, eps) / n
        e = torch.exp((_dot(k, sqi, eps) / n).clamp(-c, c))
        se = se + e
        kv = kv + k[..., :, None] * (v[:, :, t] * (e / se * n)[..., None])[..., None, :]
        outs.append(torch.sigmoid(Ic)[..., None] * torch.einsum("bhd,bhde->bhe", q * (I / n)[..., None], kv))
    return torch.stack(outs, 2), FlowState(n, sq, sk, sko, sqi, se, kv)


_ENGINES = three_forms(chunked, parallel, recurrent)


@register
class Flow(RecurrentMethod):
    info = MethodInfo(
        name="flow", seed=(62,), family="R", kind="approximate",
        patterns=frozenset({"causal-self", "noncausal-self", "noncausal-cross"}), decode=True,
        summary="Flowformer Flow-Attention: sigmoid linear attention with flow conservation, "
                "source competition and sink allocation",
        backends=tuple(e.name for e in _ENGINES), state_size="Dk*Dv + 4*Dk + 1 (+ the token count)",
        options=options(
            Option("eps", "float", 1e-6, "added to each vector before the flow dot products", low=0.0),
            Option("clamp", "float", 1.0, "bound on the conserved outgoing flow (core code 1.0; "
                   "Flowformer_NLP 5.0)", low=0.0, open_low=True),
            CHUNK_SIZE),
        references="Wu et al. 2022, arXiv 2202.06258; github.com/thuml/Flowformer")

    def engines(self):
        return _ENGINES

    def validate(self, call):
        default = call.head_dim ** -0.5
        if abs(call.scale - default) > 1e-12 * default:
            raise ArgumentError(
                f"method 'flow' takes no scale (its sigmoid feature map has no temperature); got "
                f"scale={call.scale!r}. Leave scale=None.")

    def reference(self, call):
        return parallel(call)

    def materialize(self, call):
        """``(B, H, Lq, Lk)``: ``diag(alloc) (Qp I' Kp^T masked) diag(comp)``; ``W @ v`` is the output
        (competition and allocation depend on q and k only)."""
        return weights(call)

    def sample_options(self, rng, q_len, k_len):
        return {"clamp": float(rng.choice([1.0, 5.0])), "chunk_size": int(rng.integers(1, 40))}

    def init_state(self, batch, heads, head_dim, value_dim, *, dtype, device, options):
        wd = dtype if dtype == torch.float64 else torch.float32
        z = torch.zeros(batch, heads, head_dim, dtype=wd, device=device)
        return FlowState(0, z, z, z, z, torch.zeros(batch, heads, dtype=wd, device=device),
                         torch.zeros(batch, heads, head_dim, value_dim, dtype=wd, device=device))

    def forward_state(self, call, state: FlowState):
        qp, kp, v = _inputs(call)
        out, state = _causal_chunked(qp, kp, v, call, state)
        return out.to(call.dtype), state
