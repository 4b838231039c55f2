"""The ``dense`` mask engine: materialize the pattern's mask and run SDPA (small sizes, tests).

Rows with no visible key are made all-visible before SDPA and zeroed after, so they are 0 with
finite gradients (SDPA itself returns NaN for them).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..call import AttentionCall
from .mask_spec import MaskSpec

MAX_MASK_ELEMENTS = 1 << 30


def combined_mask(call: AttentionCall, spec: MaskSpec) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The pattern's bool mask AND the call's bool attn_mask; a float attn_mask is returned as bias."""
    keep = spec.pattern.dense(call.q_len, call.k_len, call.device)
    bias = None
    if call.attn_mask is not None:
        if call.attn_mask.dtype == torch.bool:
            keep = keep & call.attn_mask
        else:
            bias = call.attn_mask
    return keep, bias


def masked_softmax_attention(q, k, v, keep, bias, scale, dropout_p=0.0, score_mod=None,
                             mod_tensors=()) -> torch.Tensor:
    """Masked attention with empty rows giving zeros; q/k/v already share heads."""
    empty = ~keep.any(-1, keepdim=True)
    if bias is not None:
        empty = empty | torch.isneginf(torch.where(keep, bias, float("-inf"))).all(-1, keepdim=True)
    safe = keep | empty
    if score_mod is None:
        mask = safe if bias is None else torch.where(safe, bias, float("-inf")).to(q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale)
    else:
        wd = torch.float64 if q.dtype == torch.float64 else torch.float32
        s = (q.to(wd) @ k.to(wd).transpose(-1, -2)) * scale
        if bias is not None:
            s = s + bias.to(wd)
        B, H, Lq, Lk = s.shape
        b = torch.arange(B, device=s.device).view(-1, 1, 1, 1)
        h = torch.arange(H, device=s.device).view(1, -1, 1, 1)
        qi = torch.arange(Lq, device=s.device).view(1, 1, -1, 1)
        ki = torch.arange(Lk, device=s.device).view(1, 1, 1, -1)
        s = score_mod(s, b, h, qi, ki, *mod_tensors)
        s = s.masked_fill(~safe, float("-inf"))
        p = torch.softmax(s, dim=-1)
        if dropout_p:
            p = F.dropout(p, dropout_p)
        out = (p @ v.to(wd)).to(q.dtype)
    return out.masked_fill(empty, 0.0)


class DenseEngine:
    """Masked SDPA over the full ``Lq x Lk`` mask."""

    name = "dense"

    def can_run(self, call: AttentionCall, spec: MaskSpec) -> str | None:
        n = call.q_len * call.k_len * (spec.pattern.batch or 1) * (spec.pattern.heads or 1)
        if n > MAX_MASK_ELEMENTS:
            return (f"would materialize a {call.q_len}x{call.k_len} mask ({n:,} elements > "
                    f"{MAX_MASK_ELEMENTS:,}); use backend='blocksparse'")
        return None

    def run(self, call: AttentionCall, spec: MaskSpec) -> torch.Tensor:
        keep, bias = combined_mask(call, spec)
        k, v = call.expanded_kv()
        return masked_softmax_attention(call.query, k, v, keep, bias, call.scale, call.dropout_p,
                                        spec.score_mod, spec.mod_tensors)
