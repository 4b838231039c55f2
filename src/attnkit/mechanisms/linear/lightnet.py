"""``lightnet``: the "additive" linear recurrence of LightNet (Qin et al., "You Only Scan Once",
arXiv 2405.21022): a per-key-channel softmax over time instead of a multiplicative decay.

    Z_t[c] = log(exp(z0) + sum_{s <= t} exp(k_s[c]))                  (z0 = initial_lse; none: -inf)
    o_t = scale * sum_c q_t[c] sum_{s <= t} exp(k_s[c] - Z_t[c]) v_s

Recurrent view (the form of the author's code): normalized key ``k~_t = exp(k_t - Z_t)``,
data-dependent decay ``lam_t = exp(Z_{t-1} - Z_t)`` in (0, 1], ``S_t = diag(lam_t) S_{t-1} +
k~_t v_t^T``, ``o_t = q_t S_t``. Because the state is a *sum* normalized per channel, the
noncausal (and cross) form is one global reduction, ``o_i = q_i softmax_over_keys(K)^T V`` — the
order of the tokens does not matter, so a 2-D or 3-D grid needs one scan (or none), not one per
direction: "you only scan once". q is expected already activated (LightNet: ``q = silu(x Wq)``;
k and v are plain projections).

Positional encodings (MD-TPE, MD-LRPE) own parameters or grid positions and are layer parts:
``ak.nn.MdTpe`` and ``ak.nn.MdLrpe`` (see ``attnkit.nn.md_pe``).

Forms (backends): ``chunked`` — decayed linear attention with per-channel cumulative log-decay
``G = -Z``; inside a chunk a binary hierarchy of blocks whose two factors ``exp(G_t - G_r)`` and
``exp(G_r - G_s)`` are both <= 1 (no overflow for any keys), across chunks a carried ``Dk x Dv`` state
(chunk a power of two); ``parallel`` — the ``Lq x Lk`` weights; ``recurrent`` — the loop above.
Patterns: all; causal cross is bottom-right aligned (keys before the first query are a prefix
that every query sees). A query with no visible key gives 0.

Sources. The official repository (OpenNLPLab/LightNet) could not be retrieved; confirmed instead
in the first author's later code, Doraemonzzz/xmixers ``modules/token_mixers/linear_attention/
lightnet_attention.py`` (q = silu(q), k not activated, ``z = logcumsumexp(cat(lse_state, k))`` with
``lse_state`` initialised to 0 — i.e. ``initial_lse=0.0`` —, ``k = exp(k - z)``, ``log_f = z[:-1] -
z[1:]``, ``chunk_gla(..., scale=1)``, then output gate, norm, out projection) and in fla
``fla/layers/lightnet.py`` (``z = k.logcumsumexp(1)`` with no initial mass — ``initial_lse=None``,
our default —, ``chunk_gla`` with its default scale ``K**-0.5`` — our default ``scale``). Pass
``scale=1.0, initial_lse=0.0`` for xmixers' numbers. [UNVERIFIED] whether the paper's own code
uses an initial mass or a scale.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...call import ALL_PATTERNS, AttentionCall
from ...options import Option
from ...registry import MethodInfo, options, register
from ._gla import gla_chunked
from .base import FormEngine, RecurrentMethod

POWERS_OF_TWO = tuple(2 ** i for i in range(11))


@dataclass
class LightNetState:
    """``kv (B, H, Dk, Dv)``: ``sum_s exp(k_s - Z) v_s^T``, normalized at ``lse (B, H, Dk)`` = Z."""

    kv: torch.Tensor
    lse: torch.Tensor


def _inputs(call: AttentionCall):
    wd = call.dtype if call.dtype == torch.float64 else torch.float32
    k, v = call.expanded_kv()
    return call.query.to(wd) * call.scale, k.to(wd), v.to(wd)


def _z0(call: AttentionCall, like: torch.Tensor) -> torch.Tensor:
    """The initial log-normalizer per channel, ``(B, H, Dk)`` (-inf: no initial mass)."""
    z0 = call.options["initial_lse"]
    return like.new_full(like.shape[:2] + like.shape[3:], float("-inf") if z0 is None else z0)


def _lse_after(k: torch.Tensor, z_prev: torch.Tensor) -> torch.Tensor:
    """``Z_t = log(exp(z_prev) + sum_{s <= t} exp(k_s))`` for every t, ``(B, H, L, Dk)``."""
    return torch.logaddexp(torch.logcumsumexp(k, 2), z_prev[:, :, None])


def _prefix(k, v, z0):
    """State after the keys of a prefix: ``(sum_j exp(k_j - Z) v_j^T, Z)``."""
    z = torch.logaddexp(torch.logsumexp(k, 2), z0) if k.shape[2] else z0
    w = torch.exp(k - z[:, :, None]) if k.shape[2] else k
    return w.transpose(-1, -2) @ v, z


def _aligned_chunked(q, k, v, state: LightNetState, chunk: int):
    """Causal, ``Lq == Lk``, continuing from ``state``; returns ``o`` and the new state."""
    Z = _lse_after(k, state.lse)
    g = torch.cat([-state.lse[:, :, None], -Z], 2)
    out, kv = gla_chunked(q, torch.exp(k - Z), v, g, state.kv, chunk)
    return out, LightNetState(kv, Z[:, :, -1])


def chunked(call: AttentionCall) -> torch.Tensor:
    q, k, v = _inputs(call)
    z0 = _z0(call, k)
    if not call.is_causal:
        kv, _ = _prefix(k, v, z0)
        return (q @ kv).to(call.dtype)
    skip, prefix = max(0, -call.causal_offset), max(0, call.causal_offset)
    out, _ = _aligned_chunked(q[:, :, skip:], k[:, :, prefix:], v[:, :, prefix:],
                              LightNetState(*_prefix(k[:, :, :prefix], v[:, :, :prefix], z0)),
                              call.options["chunk_size"])
    return torch.nn.functional.pad(out, (0, 0, skip, 0)).to(call.dtype)


def recurrent(call: AttentionCall) -> torch.Tensor:
    """Token by token: ``Z <- logaddexp(Z, k_t)``, ``S <- exp(Z_old - Z) S + exp(k_t - Z) v_t^T``;
    query i reads ``q_i S`` after the last key it sees."""
    q, k, v = _inputs(call)
    B, H, Lq, Dk = q.shape
    z = _z0(call, k)
    S = q.new_zeros(B, H, Dk, v.shape[-1])
    outs = [q.new_zeros(B, H, v.shape[-1])] * Lq
    last = [i + call.causal_offset if call.is_causal else call.k_len - 1 for i in range(Lq)]
    for j in range(call.k_len):
        z_new = torch.logaddexp(z, k[:, :, j])
        S = torch.exp(z - z_new)[..., None] * S + torch.exp(k[:, :, j] - z_new)[..., None] * v[:, :, j, None, :]
        z = z_new
        for i in (i for i, p in enumerate(last) if p == j):
            outs[i] = torch.einsum("bhd,bhde->bhe", q[:, :, i], S)
    return torch.stack(outs, 2).to(call.dtype)


def weights(call: AttentionCall) -> torch.Tensor:
    """``(B, H, Lq, Lk)``: ``W[i, j] = sum_c scale q_i[c] exp(k_j[c] - Z_i[c])`` for visible j."""
    q, k, _ = _inputs(call)
    Zk = _lse_after(k, _z0(call, k))  # Z after each key
    if call.is_causal:
        pos = torch.arange(call.q_len, device=q.device) + call.causal_offset
        Zq = Zk[:, :, pos.clamp(min=0)]
        seen = torch.arange(call.k_len, device=q.device)[None, :] <= pos[:, None]
    else:
        Zq = Zk[:, :, -1:].expand(-1, -1, call.q_len, -1)
        seen = torch.ones(call.q_len, call.k_len, dtype=torch.bool, device=q.device)
    expo = (k[:, :, None, :, :] - Zq[:, :, :, None, :]).masked_fill(~seen[..., None], float("-inf"))
    return torch.einsum("bhic,bhijc->bhij", q, torch.exp(expo))


def parallel(call: AttentionCall) -> torch.Tensor:
    return (weights(call) @ _inputs(call)[2]).to(call.dtype)


_ENGINES = (FormEngine("chunked", chunked), FormEngine("parallel", parallel),
            FormEngine("recurrent", recurrent))


@register
class LightNet(RecurrentMethod):
    info = MethodInfo(
        name="lightnet", family="R", kind="approximate", patterns=ALL_PATTERNS, decode=True,
        summary="LightNet additive recurrence: per-key-channel softmax over time (one scan for any "
                "number of dimensions)",
        backends=tuple(e.name for e in _ENGINES), state_size="Dk*Dv + Dk",
        options=options(
            Option("initial_lse", "float", None, "log of an initial normalizer mass per channel "
                   "(None: none, as fla; 0.0: one unit, as the author's xmixers code)", nullable=True),
            Option("chunk_size", "choice", 64, "chunk length of the chunked form, a power of two "
                   "(performance knob)", choices=POWERS_OF_TWO, tuning=True)),
        references="Qin et al. 2024, arXiv 2405.21022; github.com/Doraemonzzz/xmixers; fla "
                   "fla/layers/lightnet.py")

    def engines(self):
        return _ENGINES

    def reference(self, call):
        return parallel(call)

    def materialize(self, call):
        """``(B, H, Lq, Lk)``: ``W[i, j] = scale sum_c q_i[c] softmax_{s <= i}(k_s[c])_j``; ``W @ v`` is
        the output."""
        return weights(call)

    def sample_options(self, rng, q_len, k_len):
        return {"initial_lse": None if rng.random() < 0.5 else float(rng.choice([0.0, 2.0])),
                "chunk_size": int(rng.choice([1, 2, 4, 8, 16, 32]))}

    def init_state(self, batch, heads, head_dim, value_dim, *, dtype, device, options):
        wd = dtype if dtype == torch.float64 else torch.float32
        z0 = options.get("initial_lse")
        return LightNetState(torch.zeros(batch, heads, head_dim, value_dim, dtype=wd, device=device),
                             torch.full((batch, heads, head_dim), float("-inf") if z0 is None else z0,
                                        dtype=wd, device=device))

    def forward_state(self, call, state: LightNetState):
        q, k, v = _inputs(call)
        out, state = _aligned_chunked(q, k, v, state, call.options["chunk_size"])
        return out.to(call.dtype), state
