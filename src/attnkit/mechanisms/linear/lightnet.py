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

Positional encodings are layer parts (``attnkit.nn.md_pe``): ``ak.nn.MdTpe`` (MD-TPE, learned
Toeplitz mixers along each grid axis, applied to the token embeddings) and ``ak.nn.MdLrpe``
(MD-LRPE, fixed rotations by grid coordinates). As in the author's code, MD-LRPE rotates q and the
*normalized* keys ``exp(k - Z)`` inside the recurrence, so it cannot be applied from outside this
op: set ``lrpe_grid=(H, W)`` (or ``(T, H, W)``; one axis = plain 1-D positions) for self-attention
on a row-major grid; the per-channel decay then acts on the rotated channels, as in xmixers.

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

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ...call import ALL_PATTERNS, AttentionCall
from ...errors import OptionError
from ...options import Option
from ...registry import MethodInfo, options, register
from ._gla import gla_chunked
from .base import RecurrentMethod, three_forms

POWERS_OF_TWO = tuple(2 ** i for i in range(11))


@dataclass
class LightNetState:
    """``kv (B, H, Dk, Dv)``: ``sum_s exp(k_s - Z) v_s^T``, normalized at ``lse (B, H, Dk)`` = Z;
    ``position``: tokens seen so far (for ``lrpe_grid``)."""

    kv: torch.Tensor
    lse: torch.Tensor
    position: int = 0


def _inputs(call: AttentionCall):
    wd = call.dtype if call.dtype == torch.float64 else torch.float32
    k, v = call.expanded_kv()
    return call.query.to(wd) * call.scale, k.to(wd), v.to(wd)


def _z0(call: AttentionCall, like: torch.Tensor) -> torch.Tensor:
    """The initial log-normalizer per channel, ``(B, H, Dk)`` (-inf: no initial mass)."""
    z0 = call.options["initial_lse"]
    return like.new_full(like.shape[:2] + like.shape[3:], float("-inf") if z0 is None else z0)


def _rotation(call: AttentionCall, start: int = 0):
    """MD-LRPE by ``lrpe_grid`` for positions ``start..start+L-1`` (the identity when unset)."""
    grid = call.options["lrpe_grid"]
    if grid is None:
        return lambda x: x
    from ...nn.md_pe import MdLrpe, grid_coordinates

    grid = (grid,) if isinstance(grid, int) else tuple(grid)
    end = start + call.q_len
    coords = grid_coordinates(grid, end, device=call.device) if len(grid) > 1 else \
        torch.arange(end, device=call.device)[:, None]
    lrpe = MdLrpe(call.head_dim, len(grid), call.options["lrpe_base"])
    return lambda x: lrpe(x, coords[start:])


def _lse_after(k: torch.Tensor, z_prev: torch.Tensor) -> torch.Tensor:
    """``Z_t = log(exp(z_prev) + sum_{s <= t} exp(k_s))`` for every t, ``(B, H, L, Dk)``."""
    return torch.logaddexp(torch.logcumsumexp(k, 2), z_prev[:, :, None])


def _prefix(k, v, z0):
    """State after the keys of a prefix: ``(sum_j exp(k_j - Z) v_j^T, Z)``."""
    z = torch.logaddexp(torch.logsumexp(k, 2), z0) if k.shape[2] else z0
    w = torch.exp(k - z[:, :, None]) if k.shape[2] else k
    return w.transpose(-1, -2) @ v, z


def _aligned_chunked(q, k, v, state: LightNetState, chunk: int, rot):
    """Causal, ``Lq == Lk``, continuing from ``state``; returns ``o`` and the new state."""
    Z = _lse_after(k, state.lse)
    g = torch.cat([-state.lse[:, :, None], -Z], 2)
    out, kv = gla_chunked(rot(q), rot(torch.exp(k - Z)), v, g, state.kv, chunk)
    return out, LightNetState(kv, Z[:, :, -1], state.position + q.shape[2])


def chunked(call: AttentionCall) -> torch.Tensor:
    q, k, v = _inputs(call)
    z0, rot = _z0(call, k), _rotation(call)
    if not call.is_causal:
        Z = torch.logaddexp(torch.logsumexp(k, 2), z0)[:, :, None]
        return (rot(q) @ (rot(torch.exp(k - Z)).transpose(-1, -2) @ v)).to(call.dtype)
    skip, prefix = max(0, -call.causal_offset), max(0, call.causal_offset)
    out, _ = _aligned_chunked(q[:, :, skip:], k[:, :, prefix:], v[:, :, prefix:],
                              LightNetState(*_prefix(k[:, :, :prefix], v[:, :, :prefix], z0)),
                              call.options["chunk_size"], rot)
    return F.pad(out, (0, 0, skip, 0)).to(call.dtype)


def recurrent(call: AttentionCall) -> torch.Tensor:
    """Token by token: ``Z <- logaddexp(Z, k_t)``, ``S <- exp(Z_old - Z) S + exp(k_t - Z) v_t^T``
    (keys rotated after normalizing, with ``lrpe_grid``); query i reads ``q_i S`` after the last key
    it sees. Noncausal: one pass over the keys, normalized by the total."""
    q, k, v = _inputs(call)
    B, H, Lq, Dk = q.shape
    rot = _rotation(call)
    q, z = rot(q), _z0(call, k)
    S = q.new_zeros(B, H, Dk, v.shape[-1])
    if not call.is_causal:
        for j in range(call.k_len):
            z = torch.logaddexp(z, k[:, :, j])
        kf = rot(torch.exp(k - z[:, :, None]))
        for j in range(call.k_len):
            S = S + kf[:, :, j, :, None] * v[:, :, j, None, :]
        return (q @ S).to(call.dtype)
    lse = []
    for j in range(call.k_len):
        z_prev, z = z, torch.logaddexp(z, k[:, :, j])
        lse.append((z_prev, z))
    kf = rot(torch.exp(k - torch.stack([b for _, b in lse], 2)))
    outs = [q.new_zeros(B, H, v.shape[-1])] * Lq
    emit: dict[int, list[int]] = {}
    for i in range(Lq):
        emit.setdefault(i + call.causal_offset, []).append(i)
    for j, (z_prev, z) in enumerate(lse):
        S = torch.exp(z_prev - z)[..., None] * S + kf[:, :, j, :, None] * v[:, :, j, None, :]
        for i in emit.get(j, ()):
            outs[i] = torch.einsum("bhd,bhde->bhe", q[:, :, i], S)
    return torch.stack(outs, 2).to(call.dtype)


def weights(call: AttentionCall) -> torch.Tensor:
    """``(B, H, Lq, Lk)``: ``W[i, j] = sum_c q~_i[c] k~_j[c] exp(Z_j[c] - Z_i[c])`` over visible j,
    ``k~_j = exp(k_j - Z_j)`` (q~, k~ rotated when ``lrpe_grid`` is set). Without rotation this is
    ``scale sum_c q_i[c] softmax_{s <= i}(k_s[c])_j``."""
    q, k, _ = _inputs(call)
    rot, z0 = _rotation(call), _z0(call, k)
    if not call.is_causal:
        Z = torch.logaddexp(torch.logsumexp(k, 2), z0)[:, :, None]
        return rot(q) @ rot(torch.exp(k - Z)).transpose(-1, -2)
    Zk = _lse_after(k, z0)  # Z after each key
    pos = torch.arange(call.q_len, device=q.device) + call.causal_offset
    Zq = Zk[:, :, pos.clamp(min=0)]
    seen = torch.arange(call.k_len, device=q.device)[None, :] <= pos[:, None]
    expo = (Zk[:, :, None, :, :] - Zq[:, :, :, None, :]).masked_fill(~seen[..., None], float("-inf"))
    return torch.einsum("bhic,bhjc,bhijc->bhij", rot(q), rot(torch.exp(k - Zk)), torch.exp(expo))


def parallel(call: AttentionCall) -> torch.Tensor:
    return (weights(call) @ _inputs(call)[2]).to(call.dtype)


_ENGINES = three_forms(chunked, parallel, recurrent)


@register
class LightNet(RecurrentMethod):
    info = MethodInfo(
        name="lightnet", seed=(5,), family="R", kind="approximate", patterns=ALL_PATTERNS, decode=True,
        summary="LightNet additive recurrence: per-key-channel softmax over time (one scan for any "
                "number of dimensions)",
        backends=tuple(e.name for e in _ENGINES), state_size="Dk*Dv + Dk",
        options=options(
            Option("initial_lse", "float", None, "log of an initial normalizer mass per channel "
                   "(None: none, as fla; 0.0: one unit, as the author's xmixers code)", nullable=True),
            Option("lrpe_grid", "ints", None, "MD-LRPE: row-major grid of the (self-attention) "
                   "sequence, e.g. (H, W) or (T, H, W); one axis = 1-D positions", low=1, nullable=True),
            Option("lrpe_base", "float", 10000.0, "MD-LRPE rotation base", low=1.0, open_low=True),
            Option("chunk_size", "choice", 64, "chunk length of the chunked form, a power of two "
                   "(performance knob)", choices=POWERS_OF_TWO, tuning=True)),
        references="Qin et al. 2024, arXiv 2405.21022; github.com/Doraemonzzz/xmixers; fla "
                   "fla/layers/lightnet.py")

    def engines(self):
        return _ENGINES

    def validate(self, call):
        grid = call.options["lrpe_grid"]
        if grid is None:
            return
        axes = 1 if isinstance(grid, int) else len(grid)
        if not call.is_self:
            raise OptionError(f"method 'lightnet': lrpe_grid={grid!r} needs self-attention (Lq == Lk), "
                              f"got Lq={call.q_len}, Lk={call.k_len}; drop lrpe_grid for cross-attention.")
        if call.head_dim < 2 * axes:
            raise OptionError(f"method 'lightnet': lrpe_grid with {axes} axes needs head_dim >= "
                              f"{2 * axes}, got {call.head_dim}.")
        if axes > 1 and math.prod(grid) != call.q_len:
            raise OptionError(f"method 'lightnet': lrpe_grid={tuple(grid)} holds {math.prod(grid)} "
                              f"tokens but the sequence has {call.q_len}; the grid must match L.")

    def reference(self, call):
        return parallel(call)

    def materialize(self, call):
        """``(B, H, Lq, Lk)``: ``W[i, j] = scale sum_c q_i[c] softmax_{s <= i}(k_s[c])_j`` (with
        ``lrpe_grid``: the rotated form, see ``weights``); ``W @ v`` is the output."""
        return weights(call)

    def sample_options(self, rng, q_len, k_len):
        opts = {"initial_lse": None if rng.random() < 0.5 else float(rng.choice([0.0, 2.0])),
                "chunk_size": int(rng.choice([1, 2, 4, 8, 16, 32]))}
        if q_len == k_len and rng.random() < 0.3:
            opts["lrpe_grid"] = (q_len,)
        return opts

    def init_state(self, batch, heads, head_dim, value_dim, *, dtype, device, options):
        wd = dtype if dtype == torch.float64 else torch.float32
        z0 = options.get("initial_lse")
        return LightNetState(torch.zeros(batch, heads, head_dim, value_dim, dtype=wd, device=device),
                             torch.full((batch, heads, head_dim), float("-inf") if z0 is None else z0,
                                        dtype=wd, device=device))

    def forward_state(self, call, state: LightNetState):
        q, k, v = _inputs(call)
        rot = _rotation(call, state.position)
        out, state = _aligned_chunked(q, k, v, state, call.options["chunk_size"], rot)
        return out.to(call.dtype), state
