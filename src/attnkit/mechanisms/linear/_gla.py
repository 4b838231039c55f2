"""Decayed (gated) linear attention with a cumulative log-decay: the shared core of ``lightning``,
``lightnet`` and ``aaren``'s shared-query scan.

For queries ``q (B, H, L, K)``, keys ``k (B, H, L, K)``, values ``v (B, H, L, V)`` and a cumulative
log-decay ``G`` given at positions ``-1 .. L-1`` as ``g (B|1, H, L+1, K|1)``, nonincreasing along the
sequence, and a state ``S0 (B, H, K, V)`` sitting at position -1:

    o_t = sum_{s <= t} sum_c q_t[c] k_s[c] exp(G_t[c] - G_s[c]) v_s  +  sum_c q_t[c] exp(G_t[c] - G_-1[c]) S0[c]
    S_t = exp(G_t - G_{t-1}) * S_{t-1} + k_t v_t^T                                     (the recurrence)

``G`` with last size 1 is a scalar decay per head (Lightning, Aaren); size K is a decay per key
channel (LightNet). Only differences of ``G`` inside a chunk or between neighbouring chunk ends are
used; they are taken in ``g``'s own dtype (pass float64 for a long constant-decay ramp) and cast
to the working dtype before the exponential. Every exponential has a non-positive argument, so no factor exceeds 1 and no overflow
can occur, whatever the decay: for the per-channel decay the intra-chunk part is split in a binary
hierarchy (left half of a block = keys, right half = queries, reference at the end of the left
half), the stable form of GLA's secondary chunking; the diagonal ``t = s`` is elementwise.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ...patterns.plan import cdiv


def lower(n: int, device) -> torch.Tensor:
    """``(n, n)`` bool, True on and below the diagonal."""
    i = torch.arange(n, device=device)
    return i[:, None] >= i[None, :]


def _pad_to_chunks(q, k, v, g, chunk):
    """Zero-pad q/k/v to whole chunks; extend g with its last value (decay 1 over the padding, so
    the state at the padded end is the state at position L-1)."""
    L = q.shape[2]
    pad = cdiv(L, chunk) * chunk - L
    if pad:
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
        g = torch.cat([g, g[:, :, -1:].expand(-1, -1, pad, -1)], 2)
    return q, k, v, g


def _intra_scalar(Q, K, V, Gc):
    """Within-chunk part for a scalar decay: ``((Q K^T) * D) V`` with ``D[a, b] = exp(G_a - G_b)``, a >= b."""
    C = Q.shape[3]
    diff = Gc[..., :, None, 0] - Gc[..., None, :, 0]
    keep = lower(C, Q.device)
    D = torch.exp(diff.to(Q.dtype).masked_fill(~keep, float("-inf")))
    return ((Q @ K.transpose(-1, -2)) * D) @ V


def _intra_channel(Q, K, V, Gc):
    """Within-chunk part for a per-channel decay (chunk a power of two): binary hierarchy + diagonal."""
    *lead, C, Dk = Q.shape
    out = (Q * K).sum(-1, keepdim=True) * V
    h = C // 2
    while h >= 1:
        split = (*lead, C // (2 * h), 2, h)
        Qb, Kb, Vb = Q.reshape(*split, Dk), K.reshape(*split, Dk), V.reshape(*split, V.shape[-1])
        Gb = Gc.reshape(*Gc.shape[:-2], C // (2 * h), 2, h, Gc.shape[-1])
        ref = Gb[..., 0, h - 1:, :]  # G at the last key of each left half
        qr = Qb[..., 1, :, :] * torch.exp((Gb[..., 1, :, :] - ref).to(Q.dtype))
        kl = Kb[..., 0, :, :] * torch.exp((ref - Gb[..., 0, :, :]).to(Q.dtype))
        right = (qr @ kl.transpose(-1, -2)) @ Vb[..., 0, :, :]
        out = out + torch.stack([torch.zeros_like(right), right], -3).reshape(out.shape)
        h //= 2
    return out


def gla_chunked(q, k, v, g, s0, chunk: int):
    """The chunked form. Returns ``o (B, H, L, V)`` and the state at position L-1 (reference G_{L-1})."""
    B, H, L, Dk = q.shape
    per_channel = g.shape[-1] > 1
    if per_channel and chunk & (chunk - 1):
        raise ValueError(f"per-channel decay needs a power-of-two chunk, got {chunk}")
    q, k, v, g = _pad_to_chunks(q, k, v, g, chunk)
    n = q.shape[2] // chunk
    Q, K, V = (t.reshape(B, H, n, chunk, t.shape[-1]) for t in (q, k, v))
    Gc = g[:, :, 1:].reshape(g.shape[0], H, n, chunk, g.shape[-1])
    g_start = g[:, :, 0:-1:chunk]  # G at the position before each chunk, (.., n, K')
    g_end = Gc[..., -1, :]
    dt = q.dtype
    o = _intra_channel(Q, K, V, Gc) if per_channel else _intra_scalar(Q, K, V, Gc)
    # inter-chunk: per-chunk contributions referenced to the chunk end, carried with decay <= 1
    k_end = K * torch.exp((g_end[..., None, :] - Gc).to(dt))
    U = k_end.transpose(-1, -2) @ V  # (B, H, n, K, V)
    carry = torch.exp((g_end - g_start).to(dt))[..., None]  # (B|1, H, n, K'|1, 1)
    # unbind, not U[:, :, m]: a select's backward writes a full-size zero tensor per step (O(n^2))
    state, before = s0, []
    for carry_m, U_m in zip(carry.unbind(2), U.unbind(2)):
        before.append(state)
        state = carry_m * state + U_m
    S = torch.stack(before, 2)
    q_start = Q * torch.exp((Gc - g_start[..., None, :]).to(dt))
    o = o + q_start @ S
    return o.reshape(B, H, n * chunk, -1)[:, :, :L], state


def gla_recurrent(q, k, v, g, s0):
    """The recurrent form: one token at a time. Returns ``o`` and the final state."""
    S, outs = s0, []
    dt = q.dtype
    for t in range(q.shape[2]):
        decay = torch.exp((g[:, :, t + 1] - g[:, :, t]).to(dt))[..., None]
        S = decay * S + k[:, :, t, :, None] * v[:, :, t, None, :]
        outs.append(torch.einsum("bhd,bhde->bhe", q[:, :, t], S))
    return torch.stack(outs, 2), S


def gla_parallel(q, k, v, g):
    """The parallel form from a zero state: materializes ``W[t, s] = sum_c q_t k_s exp(G_t - G_s)``."""
    W = gla_weights(q, k, g)
    return W @ v


def gla_weights(q, k, g):
    """``(B, H, L, L)`` causal weights of the decayed form (the implicit attention matrix)."""
    L = q.shape[2]
    G = g[:, :, 1:]
    diff = G[:, :, :, None, :] - G[:, :, None, :, :]  # (B|1, H, L, L, K')
    keep = lower(L, q.device)[..., None]
    decay = torch.exp(diff.masked_fill(~keep, float("-inf"))).to(q.dtype)
    if g.shape[-1] == 1:
        return (q @ k.transpose(-1, -2)) * decay[..., 0]
    return torch.einsum("bhtc,bhsc,bhtsc->bhts", q, k, decay)
