"""``lightning``: Lightning Attention-1/2, the decayed linear attention of TransNormerLLM
(Qin et al., arXiv 2307.14995 and 2401.04658).

    o_i = sum_{j <= i} lam_h^(i - j) (scale * q_i . k_j) v_j,        lam_h = exp(-s_h)

No feature map, no softmax and no denominator inside the op: TransNormerLLM normalizes the output
afterwards (a LayerNorm / SRMSNorm over the concatenated heads) and activates q, k, v with SiLU
before it (both are layer parts, outside this function). Slopes follow the ALiBi schedule per head:
``s_h = 2^(-8 h / H)``, h = 1..H, for H a power of two; otherwise the schedule of the next lower power
of two followed by every other slope of the doubled schedule. ``slope_scale`` multiplies them
(TransNormerLLM uses ``1 - l / (num_layers - 1) + 1e-5`` for layer l, so the last layer has almost no
decay); ``slopes`` overrides the schedule with your own ``(H,)`` tensor; slopes 0 give plain
unnormalized causal linear attention.

Forms (backends): ``chunked`` — the Lightning-2 tiling: inside a chunk the masked "left product"
``((Q K^T) * D) V`` with ``D[a, b] = lam^(a - b)``, across chunks the "right product" with a carried
``Dk x Dv`` state, ``S <- lam^C S + (lam^(C-1-b) K)^T V``; ``parallel`` — the ``Lq x Lk`` decayed
score matrix; ``recurrent`` — ``S_t = lam S_{t-1} + k_t v_t^T, o_t = q_t S_t``.

Patterns. Causal self is the paper's. Causal cross uses attnkit's bottom-right positions (query i at
key position ``i + Lk - Lq``; keys before the first query enter as a decayed prefix state).
Noncausal (self and cross) uses the symmetric decay ``lam^|i - j|``: a forward plus a backward
scan, the usual bidirectional extension of decayed linear attention — not in the official code.

``scale`` multiplies q (default ``D**-0.5``, as fla's ``chunk_lightning_attn``); the official
``lightning_attn_func`` applies no scale: pass ``scale=1.0`` to match it. Note that fla's
``chunk_lightning_attn`` decays with ``g_gamma = -(8/H)(1 - l/L) h`` for h = 0..H-1 (log-decay linear
in h, head 0 undecayed), not the official schedule; ``slopes=8/H * arange(H)`` reproduces it.

Confirmed in OpenNLPLab/lightning-attention (snapshot 2025-02-23):
``lightning_attn/utils/utils.py::_build_slope_tensor`` (start = ratio = 2^(-2^-(log2 H - 3)) =
2^(-8/H), slopes start*ratio^i, the non-power-of-two rule); ``ops/torch/linear_attention.py::linear_attn``
(reference: ``(QK^T * exp(-s (i-j)) masked) V``, no scale, no normalization);
``ops/triton/lightning_attn2.py::_fwd_kernel`` (block 64, q decay ``exp(-s a)``, k decay
``exp(-s (BLOCK - b))``, block decay ``exp(-s BLOCK)``, fp32 state ``kv``; here the same exponents
shifted by one power, identical); ``examples/module/tnl_attn.py`` (SiLU on q, k, v; LayerNorm on the
output; sigmoid low-rank output gate; layer rescaling ``1 - l/(L-1) + 1e-5``).
Not confirmed: the paper's SRMSNorm and LRPE-d inside TransNormerLLM (not in that repository).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ...call import ALL_PATTERNS, AttentionCall
from ...errors import OptionError
from ...options import Option
from ...registry import MethodInfo, options, register
from ._gla import gla_chunked, gla_recurrent
from .base import CHUNK_SIZE, RecurrentMethod, three_forms


def alibi_slopes(heads: int) -> list[float]:
    """The per-head decay rates ``s_h`` of Lightning / ALiBi for ``heads`` heads."""
    def power_of_two(n):
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    if math.log2(heads).is_integer():
        return power_of_two(heads)
    p = 2 ** math.floor(math.log2(heads))
    return power_of_two(p) + alibi_slopes(2 * p)[0::2][: heads - p]


def _log_decay(call: AttentionCall) -> torch.Tensor:
    """``log lam_h = -s_h * slope_scale`` as float64 ``(H,)``."""
    given = call.options["slopes"]
    if given is None:
        s = torch.tensor(alibi_slopes(call.heads), dtype=torch.float64, device=call.device)
    else:
        s = given.reshape(-1).to(device=call.device, dtype=torch.float64)
    return -s * call.options["slope_scale"]


def _inputs(call: AttentionCall):
    wd = call.dtype if call.dtype == torch.float64 else torch.float32
    k, v = call.expanded_kv()
    return call.query.to(wd) * call.scale, k.to(wd), v.to(wd)


def _ramp(n: int, log_lam: torch.Tensor) -> torch.Tensor:
    """Cumulative log-decay ``G_t = (t + 1) log lam`` for t = -1..n-1, float64 ``(1, H, n+1, 1)``."""
    t = torch.arange(n + 1, dtype=torch.float64, device=log_lam.device)
    return (log_lam[:, None] * t)[None, :, :, None]


def _prefix_state(k, v, log_lam):
    """``sum_j lam^(P-1-j) k_j v_j^T`` over P keys: the state just after them."""
    P = k.shape[2]
    w = torch.exp(log_lam[:, None] * torch.arange(P - 1, -1, -1, dtype=torch.float64, device=k.device))
    return torch.einsum("hj,bhjd,bhje->bhde", w.to(k.dtype), k, v)


def _causal(q, k, v, log_lam, offset: int, run):
    """Query i sees key j <= i + offset with weight ``lam^(i + offset - j)``; ``run`` is a form of
    the aligned problem (``gla_chunked`` or ``gla_recurrent``)."""
    B, H, Lq, _ = q.shape
    skip, prefix = max(0, -offset), max(0, offset)
    n = Lq - skip
    s0 = _prefix_state(k[:, :, :prefix], v[:, :, :prefix], log_lam)
    ka, va = k[:, :, prefix:prefix + n], v[:, :, prefix:prefix + n]
    short = n - ka.shape[2]
    if short > 0:  # queries past the last key: zero keys keep the decay running
        ka, va = F.pad(ka, (0, 0, 0, short)), F.pad(va, (0, 0, 0, short))
    if n <= 0:
        return q.new_zeros(B, H, Lq, v.shape[-1])
    out, _ = run(q[:, :, skip:], ka, va, _ramp(n, log_lam), s0)
    return F.pad(out, (0, 0, skip, 0))


def _run(call: AttentionCall, run) -> torch.Tensor:
    q, k, v = _inputs(call)
    log_lam = _log_decay(call)
    out = _causal(q, k, v, log_lam, call.causal_offset, run)
    if not call.is_causal:  # keys after the query: a backward scan on the flipped sequence
        back = _causal(q.flip(2), k.flip(2), v.flip(2), log_lam, -1, run).flip(2)
        out = out + torch.exp(log_lam).to(out.dtype)[:, None, None] * back
    return out.to(call.dtype)


def chunked(call: AttentionCall) -> torch.Tensor:
    size = call.options["chunk_size"]
    return _run(call, lambda q, k, v, g, s0: gla_chunked(q, k, v, g, s0, size))


def recurrent(call: AttentionCall) -> torch.Tensor:
    return _run(call, gla_recurrent)


def weights(call: AttentionCall) -> torch.Tensor:
    """The ``(B, H, Lq, Lk)`` decayed score matrix (the implicit attention matrix)."""
    q, k, _ = _inputs(call)
    pos = torch.arange(call.q_len, device=call.device)[:, None] + call.causal_offset
    dist = (pos - torch.arange(call.k_len, device=call.device)[None, :]).to(torch.float64)
    decay = torch.exp(_log_decay(call)[:, None, None] * dist.abs())
    if call.is_causal:
        decay = decay * (dist >= 0)
    return (q @ k.transpose(-1, -2)) * decay.to(q.dtype)


def parallel(call: AttentionCall) -> torch.Tensor:
    return (weights(call) @ _inputs(call)[2]).to(call.dtype)


_ENGINES = three_forms(chunked, parallel, recurrent)


@register
class Lightning(RecurrentMethod):
    info = MethodInfo(
        name="lightning", seed=(46,), family="R", kind="approximate", patterns=ALL_PATTERNS, decode=True,
        summary="Lightning Attention (TransNormerLLM): linear attention with a fixed per-head decay lam^(i-j)",
        backends=tuple(e.name for e in _ENGINES), state_size="Dk*Dv",
        options=options(
            Option("slopes", "tensor", None, "per-head decay rates s_h >= 0, shape (H,); None = the "
                   "ALiBi schedule 2^(-8h/H)", nullable=True),
            Option("slope_scale", "float", 1.0, "multiplies the slopes (TransNormerLLM: "
                   "1 - layer/(num_layers-1) + 1e-5)", low=0.0),
            CHUNK_SIZE),
        references="Qin et al. 2023 (TransNormerLLM, arXiv 2307.14995); Qin et al. 2024 "
                   "(Lightning Attention-2, arXiv 2401.04658); github.com/OpenNLPLab/lightning-attention")

    def engines(self):
        return _ENGINES

    def validate(self, call):
        s = call.options["slopes"]
        if s is None:
            return
        if s.numel() != call.heads or s.is_complex():
            raise OptionError(
                f"method 'lightning': option slopes has shape {tuple(s.shape)}; it must hold one real "
                f"slope per query head, shape ({call.heads},).")
        if not bool(torch.isfinite(s).all()) or bool((s < 0).any()):
            raise OptionError("method 'lightning': option slopes must be finite and >= 0 (a negative "
                              "slope would make the decay grow without bound); got "
                              f"min {float(s.min()):g}.")

    def reference(self, call):
        return parallel(call)

    def materialize(self, call):
        """``(B, H, Lq, Lk)``: ``W[i, j] = scale q_i.k_j lam^|i - j|`` (masked when causal); ``W @ v``
        is the output."""
        return weights(call)

    def sample_options(self, rng, q_len, k_len):
        return {"slope_scale": float(rng.choice([0.0, 0.3, 1.0, 2.0])),
                "chunk_size": int(rng.integers(1, 40))}

    def init_state(self, batch, heads, head_dim, value_dim, *, dtype, device, options):
        wd = dtype if dtype == torch.float64 else torch.float32
        return torch.zeros(batch, heads, head_dim, value_dim, dtype=wd, device=device)

    def forward_state(self, call, state):
        q, k, v = _inputs(call)
        out, state = gla_chunked(q, k, v, _ramp(call.q_len, _log_decay(call)), state,
                                 call.options["chunk_size"])
        return out.to(call.dtype), state
