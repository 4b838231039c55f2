"""The float64 oracle: dense masked softmax attention, the one definition every exact method is
tested against."""

from __future__ import annotations

import math

import torch

from .errors import ShapeError


def causal_mask(q_len: int, k_len: int, device=None) -> torch.Tensor:
    """Bottom-right causal mask ``(Lq, Lk)``: query i sees key j iff ``j <= i + Lk - Lq``."""
    i = torch.arange(q_len, device=device)[:, None]
    j = torch.arange(k_len, device=device)[None, :]
    return j <= i + (k_len - q_len)


def reference(query, key, value, *, mask=None, bias=None, is_causal=False, scale=None,
              return_lse=False):
    """Exact attention in float64.

    query ``(B, H, Lq, D)``, key ``(B, Hkv, Lk, D)``, value ``(B, Hkv, Lk, Dv)``; ``H`` must be a
    multiple of ``Hkv`` (GQA: query head h uses kv head ``h // (H // Hkv)``). ``mask`` is bool
    (True = attend) broadcastable to ``(B, H, Lq, Lk)``; ``bias`` is added to the scores; a float
    ``mask`` is treated as a bias. Causal is bottom-right aligned. A row with no visible key is 0
    (its log-sum-exp is -inf). Returns ``(B, H, Lq, Dv)`` in float64 (and the ``(B, H, Lq)``
    log-sum-exp if ``return_lse``).
    """
    q, k, v = (t.to(torch.float64) for t in (query, key, value))
    H, Hk = q.shape[1], k.shape[1]
    if H % Hk:
        raise ShapeError(f"reference: query heads {H} is not a multiple of key heads {Hk}.")
    if H != Hk:
        k = k.repeat_interleave(H // Hk, dim=1)
        v = v.repeat_interleave(H // Hk, dim=1)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    s = (q @ k.transpose(-1, -2)) * scale
    if mask is not None and mask.dtype != torch.bool:
        bias = mask if bias is None else bias + mask
        mask = None
    if bias is not None:
        s = s + bias.to(torch.float64)
    keep = torch.ones_like(s, dtype=torch.bool)
    if mask is not None:
        keep = keep & mask
    if is_causal:
        keep = keep & causal_mask(q.shape[2], k.shape[2], q.device)
    keep = keep & (s > float("-inf"))
    s = s.masked_fill(~keep, float("-inf"))
    m = s.amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    p = torch.exp(s - m)
    denom = p.sum(-1, keepdim=True)
    # empty rows: denom == 0 (else >= 1); divide them by 1, not by a tiny clamp whose reciprocal
    # overflows the backward pass (0 * inf = NaN in the value gradient)
    out = (p @ v) / torch.where(denom > 0, denom, torch.ones_like(denom))
    if return_lse:
        lse = (m + torch.log(denom)).squeeze(-1)
        return out, lse
    return out
