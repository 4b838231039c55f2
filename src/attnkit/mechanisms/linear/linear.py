"""``linear``: kernelized linear attention (Katharopoulos et al., 2020, "Transformers are RNNs").

    out_i = sum_{j visible} phi(q_i)·phi(k_j) v_j / (sum_{j visible} phi(q_i)·phi(k_j) + eps)

with ``phi(x) = elu(x) + 1`` by default (``relu`` and ``softplus`` selectable). ``scale`` multiplies
``phi(q)``; with ``normalize=True`` it cancels (kept for fla parity, where ``scale`` defaults to
``D**-0.5``). A query with no visible key gives 0. Causal uses attnkit's bottom-right alignment.

Forms (backends): ``chunked`` — exact within chunks, prefix state across chunks, memory linear
in L; ``parallel`` — the ``Lq x Lk`` map; ``recurrent`` — token by token with state
``S = sum phi(k) v^T (Dk x Dv)`` and ``z = sum phi(k) (Dk)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ...call import ALL_PATTERNS, AttentionCall
from ...options import Option
from ...patterns.plan import cdiv
from ...reference import causal_mask
from ...registry import MethodInfo, options, register
from .base import CHUNK_SIZE, RecurrentMethod, causal_split, three_forms

FEATURE_MAPS = {
    "elu": lambda x: F.elu(x) + 1.0,
    "relu": F.relu,
    "softplus": F.softplus,
}


@dataclass
class LinearState:
    """``S (B, H, Dk, Dv)`` and ``z (B, H, Dk)``: the sums over the keys seen so far."""

    kv: torch.Tensor
    k_sum: torch.Tensor


def _features(call: AttentionCall):
    phi = FEATURE_MAPS[call.options["feature_map"]]
    wd = call.dtype if call.dtype == torch.float64 else torch.float32
    k, v = call.expanded_kv()
    return phi(call.query.to(wd)) * call.scale, phi(k.to(wd)), v.to(wd)


def _finish(num, den, call: AttentionCall):
    if not call.options["normalize"]:
        return num.to(call.dtype)
    den = den + call.options["eps"]
    safe = torch.where(den == 0, torch.ones_like(den), den)
    return torch.where((den == 0)[..., None], torch.zeros_like(num), num / safe[..., None]).to(call.dtype)


# -- parallel ---------------------------------------------------------------------------------
def parallel(call: AttentionCall) -> torch.Tensor:
    qf, kf, v = _features(call)
    a = qf @ kf.transpose(-1, -2)
    if call.is_causal:
        a = a * causal_mask(call.q_len, call.k_len, a.device)
    return _finish(a @ v, a.sum(-1), call)


# -- chunked ----------------------------------------------------------------------------------
def chunked_causal(qf, kf, v, kv0, z0, chunk: int):
    """Aligned causal linear attention (``Lq == Lk``) from state ``(kv0, z0)``.
    Returns ``num (B,H,L,Dv)``, ``den (B,H,L)`` and the final state."""
    B, H, L, Dk = qf.shape
    n = cdiv(L, chunk)
    pad = n * chunk - L
    if pad:
        qf, kf, v = (F.pad(t, (0, 0, 0, pad)) for t in (qf, kf, v))
    Q, K, V = (t.reshape(B, H, n, chunk, t.shape[-1]) for t in (qf, kf, v))
    kv = torch.einsum("bhncd,bhnce->bhnde", K, V)
    kz = K.sum(3)
    kv_before = kv0[:, :, None] + torch.cumsum(kv, 2) - kv
    z_before = z0[:, :, None] + torch.cumsum(kz, 2) - kz
    tril = torch.ones(chunk, chunk, dtype=torch.bool, device=qf.device).tril()
    a = torch.einsum("bhncd,bhnmd->bhncm", Q, K) * tril
    num = torch.einsum("bhncd,bhnde->bhnce", Q, kv_before) + a @ V
    den = torch.einsum("bhncd,bhnd->bhnc", Q, z_before) + a.sum(-1)
    num = num.reshape(B, H, n * chunk, -1)[:, :, :L]
    den = den.reshape(B, H, n * chunk)[:, :, :L]
    return num, den, kv_before[:, :, -1] + kv[:, :, -1], z_before[:, :, -1] + kz[:, :, -1]


def _zero_state(qf, v):
    B, H, _, Dk = qf.shape
    return (qf.new_zeros(B, H, Dk, v.shape[-1]), qf.new_zeros(B, H, Dk))


def chunked(call: AttentionCall) -> torch.Tensor:
    qf, kf, v = _features(call)
    if not call.is_causal:
        kv = torch.einsum("bhld,bhle->bhde", kf, v)
        return _finish(qf @ kv, torch.einsum("bhld,bhd->bhl", qf, kf.sum(2)), call)
    skip, prefix = causal_split(call)
    kv0 = torch.einsum("bhld,bhle->bhde", kf[:, :, :prefix], v[:, :, :prefix])
    z0 = kf[:, :, :prefix].sum(2)
    num, den, _, _ = chunked_causal(qf[:, :, skip:], kf[:, :, prefix:], v[:, :, prefix:], kv0, z0,
                                    call.options["chunk_size"])
    if skip:
        num = F.pad(num, (0, 0, skip, 0))
        den = F.pad(den, (skip, 0))
    return _finish(num, den, call)


# -- recurrent --------------------------------------------------------------------------------
def recurrent_causal(qf, kf, v, kv, z):
    """Token by token (``Lq == Lk``); returns num, den and the final state."""
    nums, dens = [], []
    for t in range(qf.shape[2]):
        kv = kv + kf[:, :, t, :, None] * v[:, :, t, None, :]
        z = z + kf[:, :, t]
        nums.append(torch.einsum("bhd,bhde->bhe", qf[:, :, t], kv))
        dens.append((qf[:, :, t] * z).sum(-1))
    return torch.stack(nums, 2), torch.stack(dens, 2), kv, z


def recurrent(call: AttentionCall) -> torch.Tensor:
    qf, kf, v = _features(call)
    kv, z = _zero_state(qf, v)
    if not call.is_causal:
        for t in range(kf.shape[2]):
            kv = kv + kf[:, :, t, :, None] * v[:, :, t, None, :]
            z = z + kf[:, :, t]
        return _finish(qf @ kv, torch.einsum("bhld,bhd->bhl", qf, z), call)
    skip, prefix = causal_split(call)
    for t in range(prefix):
        kv = kv + kf[:, :, t, :, None] * v[:, :, t, None, :]
        z = z + kf[:, :, t]
    num, den, _, _ = recurrent_causal(qf[:, :, skip:], kf[:, :, prefix:], v[:, :, prefix:], kv, z)
    if skip:
        num = F.pad(num, (0, 0, skip, 0))
        den = F.pad(den, (skip, 0))
    return _finish(num, den, call)


_ENGINES = three_forms(chunked, parallel, recurrent)


@register
class Linear(RecurrentMethod):
    info = MethodInfo(
        name="linear", family="R", kind="approximate", patterns=ALL_PATTERNS, decode=True,
        summary="kernelized linear attention, phi(q)·phi(k) weights, O(L) time and state",
        backends=tuple(e.name for e in _ENGINES), state_size="Dk*Dv + Dk",
        options=options(
            Option("feature_map", "choice", "elu", "phi: elu(x)+1 (Katharopoulos), relu, softplus",
                   choices=tuple(FEATURE_MAPS)),
            Option("normalize", "bool", True, "divide by sum_j phi(q)·phi(k_j)"),
            Option("eps", "float", 1e-6, "added to the normalizer", low=0.0),
            CHUNK_SIZE),
        references="Katharopoulos et al. 2020, arXiv 2006.16236")

    def engines(self):
        return _ENGINES

    def reference(self, call):
        return parallel(call)

    def materialize(self, call):
        """``(B, H, Lq, Lk)``: ``phi(q_i).phi(k_j) / (sum_j' phi(q_i).phi(k_j') + eps)`` over visible
        keys (unnormalized when ``normalize=False``); ``W @ v`` is the output."""
        qf, kf, _ = _features(call)
        a = qf @ kf.transpose(-1, -2)
        if call.is_causal:
            a = a * causal_mask(call.q_len, call.k_len, a.device)
        if not call.options["normalize"]:
            return a
        den = a.sum(-1, keepdim=True) + call.options["eps"]
        return torch.where(den == 0, torch.zeros_like(a), a / torch.where(den == 0, torch.ones_like(den), den))

    def sample_options(self, rng, q_len, k_len):
        return {"feature_map": str(rng.choice(list(FEATURE_MAPS))),
                "normalize": bool(rng.random() < 0.8),
                "chunk_size": int(rng.integers(1, 40))}

    def bench_options(self, q_len, k_len, density=None):
        """The paper's configuration (elu + 1 features, normalized) is the declared default; there is
        no sparsity knob, so a density raises NotImplementedError (the base class's rule)."""
        return super().bench_options(q_len, k_len, density)

    def init_state(self, batch, heads, head_dim, value_dim, *, dtype, device, options):
        wd = dtype if dtype == torch.float64 else torch.float32
        return LinearState(torch.zeros(batch, heads, head_dim, value_dim, dtype=wd, device=device),
                           torch.zeros(batch, heads, head_dim, dtype=wd, device=device))

    def forward_state(self, call, state: LinearState):
        qf, kf, v = _features(call)
        num, den, kv, z = chunked_causal(qf, kf, v, state.kv, state.k_sum, call.options["chunk_size"])
        return _finish(num, den, call), LinearState(kv, z)
