"""Two-level attention over key groups (HCAM, Landmark): attend to groups, then inside them.

Keys are cut into groups of ``size`` consecutive positions (group g holds ``[g*size, (g+1)*size)``).
After a selection step has chosen, for each query row, a few groups and an *outer logit* for each
(``GroupPlan``), the output is::

    o[i, g]   = softmax_{j in g, allowed}(q_i · k_j · scale) v        (exact softmax inside the group)
    w[i, :]   = softmax over the row's chosen groups of the outer logits
    out[i]    = Σ_g w[i, g] · o[i, g]

"allowed" drops keys past the sequence, keys after the query's bottom-right position (causal) and,
for Landmark, the group's last key (the landmark token, whose value is never read). An outer
logit may be the group's own inner log-sum-exp (Landmark's current block joins the big softmax
token by token, which is the same as one group with that logit).

:func:`group_attention` computes ``o`` and the inner log-sum-exp by gathering each row's chosen
groups (``O(rows x groups x size)`` work and memory, in chunks of rows); :func:`combine` merges
them. Both are plain differentiable PyTorch. Rows with no chosen group give 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from .base import rows_per_chunk, work_dtype


@dataclass
class GroupPlan:
    """A two-level selection for one call.

    ``groups (B, H, Lq, G)`` int64 group ids per query row (-1: an unused slot); ``outer (B, H, Lq,
    G)`` their outer logits (``-inf`` for unused slots; differentiable); ``own_lse_slot``: when set,
    the slot whose outer logit is its group's inner log-sum-exp (computed by the engine);
    ``size`` keys per group; ``skip_last``: a group's last key is never read; ``causal``: keys after
    a query's bottom-right position are not read."""

    groups: torch.Tensor
    outer: torch.Tensor
    size: int
    causal: bool
    skip_last: bool = False
    own_lse_slot: int | None = None
    details: dict[str, Any] = field(default_factory=dict)

    def chosen(self) -> torch.Tensor:
        """Bool ``(B, H, Lq, nGroups)``: the groups each query row reads."""
        n = int(self.groups.max()) + 1 if self.groups.numel() else 0
        out = torch.zeros(*self.groups.shape[:3], max(n, 1), dtype=torch.bool, device=self.groups.device)
        ok = self.groups >= 0
        return out.scatter(-1, self.groups.clamp(min=0), ok)[..., :n]


def key_allowed(pos: torch.Tensor, q_pos: torch.Tensor, size: int, k_len: int, causal: bool,
                skip_last: bool) -> torch.Tensor:
    """Which gathered key positions ``pos`` may be read by queries at ``q_pos`` (broadcastable)."""
    ok = (pos >= 0) & (pos < k_len)
    if causal:
        ok = ok & (pos <= q_pos)
    if skip_last:
        ok = ok & ((pos + 1) % size != 0)
    return ok


def group_attention(q: torch.Tensor, key: torch.Tensor, value: torch.Tensor, groups: torch.Tensor, q_pos: torch.Tensor,
                    size: int, scale: float, causal: bool, skip_last: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Inner attention of rows ``q (B, H, R, D)`` (bottom-right positions ``q_pos (R,)``) over their
    ``groups (B, H, R, G)``: ``o (B, H, R, G, Dv)`` and ``lse (B, H, R, G)`` (``-inf``, ``o = 0`` for
    unused or empty groups). ``key``/``value`` are ``(B, Hkv, Lk, ·)``; work dtype float32 / float64."""
    B, H, R, G = groups.shape
    Hk, Lk = key.shape[1], key.shape[2]
    wd = work_dtype(q)
    offs = torch.arange(size, device=q.device)
    pos = groups[..., None] * size + offs  # (B, H, R, G, P)
    ok = key_allowed(pos, q_pos.view(1, 1, R, 1, 1), size, Lk, causal, skip_last) & (groups[..., None] >= 0)
    b = torch.arange(B, device=q.device).view(B, 1, 1, 1, 1)
    hk = (torch.arange(H, device=q.device) // (H // Hk)).view(1, H, 1, 1, 1)
    idx = pos.clamp(0, Lk - 1)
    kg, vg = key[b, hk, idx].to(wd), value[b, hk, idx].to(wd)  # (B, H, R, G, P, ·)
    s = torch.einsum("bhrd,bhrgpd->bhrgp", q.to(wd), kg) * scale
    alive = ok.any(-1)
    s = torch.where(ok, s, torch.where(alive[..., None], float("-inf"), 0.0))  # empty groups: finite, then dropped
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - lse[..., None]) * ok
    o = torch.einsum("bhrgp,bhrgpd->bhrgd", p, vg)
    return o, torch.where(alive, lse, float("-inf"))


def combine(o: torch.Tensor, outer: torch.Tensor) -> torch.Tensor:
    """``Σ_g softmax(outer)_g o_g``: ``o (B, H, R, G, Dv)``, ``outer (B, H, R, G)``; rows whose outer
    logits are all ``-inf`` give 0."""
    m = outer.amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(outer - m)
    den = e.sum(-1, keepdim=True)
    w = e / torch.where(den > 0, den, torch.ones_like(den))
    return torch.einsum("bhrg,bhrgd->bhrd", w, o)


def run_plan(call, plan: GroupPlan) -> torch.Tensor:
    """The two-level output ``(B, H, Lq, Dv)`` of ``plan`` on ``call``, in chunks of rows."""
    B, H, Lq, G = plan.groups.shape
    per_row = B * H * G * plan.size * max(call.head_dim, call.value_dim)
    step = rows_per_chunk(per_row, call.device)
    outs = []
    for r0 in range(0, Lq, step):
        r1 = min(Lq, r0 + step)
        q_pos = torch.arange(r0, r1, device=call.device) + call.causal_offset
        o, lse = group_attention(call.query[:, :, r0:r1], call.key, call.value, plan.groups[:, :, r0:r1], q_pos,
                                 plan.size, call.scale, plan.causal, plan.skip_last)
        outer = plan.outer[:, :, r0:r1].to(o.dtype)
        if plan.own_lse_slot is not None:
            s = plan.own_lse_slot
            outer = torch.cat([outer[..., :s], lse[..., s:s + 1], outer[..., s + 1:]], -1)
        outs.append(combine(o, outer))
    return torch.cat(outs, 2).to(call.dtype)


def top_groups(scores: torch.Tensor, eligible: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Group ids ``(..., K)`` of the ``keep`` (per row, broadcastable) best eligible entries of
    ``scores (..., n)``; unused slots are -1. ``K = max(keep)`` (at least 1 slot)."""
    n = scores.shape[-1]
    k_max = max(1, min(n, int(keep.max()) if keep.numel() else 0))
    if n == 0:
        return torch.full((*scores.shape[:-1], 1), -1, dtype=torch.long, device=scores.device)
    vals, idx = scores.masked_fill(~eligible, float("-inf")).topk(k_max, dim=-1)
    used = (torch.arange(k_max, device=scores.device) < keep[..., None]) & (vals > float("-inf"))
    return torch.where(used, idx, -1)


def gather_outer(logits_fn, groups: torch.Tensor) -> torch.Tensor:
    """Outer logits of the chosen ``groups`` via ``logits_fn(ids) -> (..., K)`` (ids clamped to 0
    for unused slots, which get ``-inf``)."""
    vals = logits_fn(groups.clamp(min=0))
    return torch.where(groups >= 0, vals, float("-inf"))


class PlanEngine:
    """The ``gather`` form: runs a method's GroupPlan (CPU and GPU)."""

    name = "gather"

    def can_run(self, call, plan) -> str | None:
        if call.dropout_p > 0:
            return "dropout_p > 0 is not supported"
        return None

    def run(self, call, plan: GroupPlan) -> torch.Tensor:
        return run_plan(call, plan)


__all__ = ["GroupPlan", "PlanEngine", "combine", "group_attention", "run_plan", "top_groups"]
