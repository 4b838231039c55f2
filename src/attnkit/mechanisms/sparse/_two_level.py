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
them: the ``gather`` form. The ``dense`` form (:func:`run_plan_dense`) computes the same output
from dense score rows — as one masked softmax whose scores get the per-(row, group) bias
``log w[i, g] - lse[i, g]``, since ``Σ_g w_g o_g = Σ_j exp(s_j - lse_g(j) + log w_g(j)) v_j`` — with
dense matmul work but no per-query copies (faster on a CPU at moderate lengths; the gather form's
work follows the keys read). Both are plain differentiable PyTorch. Rows with no chosen group
give 0.
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
    kg, vg = _gather_groups(key, groups, size, H).to(wd), _gather_groups(value, groups, size, H).to(wd)
    s = torch.einsum("bhrd,bhrgpd->bhrgp", q.to(wd), kg) * scale
    alive = ok.any(-1)
    s = torch.where(ok, s, torch.where(alive[..., None], float("-inf"), 0.0))  # empty groups: finite, then dropped
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - lse[..., None]) * ok
    o = torch.einsum("bhrgp,bhrgpd->bhrgd", p, vg)
    return o, torch.where(alive, lse, float("-inf"))


def _gather_groups(x: torch.Tensor, groups: torch.Tensor, size: int, heads: int) -> torch.Tensor:
    """Whole groups of ``x (B, Hkv, Lk, F)`` for ``groups (B, H, R, G)`` (query heads read their kv
    head; unused slots read group 0): ``(B, H, R, G, size, F)``, one contiguous block copy each."""
    B, Hk, Lk, F = x.shape
    n = -(-Lk // size)
    if n * size != Lk:
        x = torch.nn.functional.pad(x, (0, 0, 0, n * size - Lk))
    blocks = x.reshape(B * Hk * n, size, F)
    base = (torch.arange(B, device=x.device).view(B, 1, 1, 1) * Hk
            + (torch.arange(heads, device=x.device) // (heads // Hk)).view(1, heads, 1, 1)) * n
    flat = (base + groups.clamp(0, n - 1)).reshape(-1)
    return blocks.index_select(0, flat).view(*groups.shape, size, F)


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


def run_plan_dense(call, plan: GroupPlan) -> torch.Tensor:
    """The same output from dense score rows: ``s = q kᵀ`` against every key (chunks of rows), each
    key weighted ``exp(s_j - lse_g + log w_g)`` for its group g (0 unless chosen), then ``W v``.
    Dense matmul work (``O(Lq Lk D)``) but no per-query gathering."""
    B, H, Lq, G = plan.groups.shape
    P, Lk = plan.size, call.k_len
    n = -(-Lk // P)
    wd = work_dtype(call.query)
    g = call.group
    k = call.key.to(wd)
    v = call.value.to(wd)
    keys = torch.arange(n * P, device=call.device)
    outs = []
    step = rows_per_chunk(B * H * n * P * 3, call.device)
    for r0 in range(0, Lq, step):
        r1 = min(Lq, r0 + step)
        R = r1 - r0
        q = call.query[:, :, r0:r1].to(wd).reshape(B, call.kv_heads, g * R, -1)
        s = (q @ k.transpose(-1, -2)).view(B, H, R, Lk) * call.scale
        s = torch.nn.functional.pad(s, (0, n * P - Lk)).view(B, H, R, n, P)
        q_pos = (torch.arange(r0, r1, device=call.device) + call.causal_offset).view(1, 1, R, 1, 1)
        ok = key_allowed(keys.view(n, P), q_pos, P, Lk, plan.causal, plan.skip_last)
        groups = plan.groups[:, :, r0:r1]
        chosen = torch.zeros(B, H, R, n + 1, dtype=torch.bool, device=call.device)
        chosen = chosen.scatter(-1, torch.where(groups >= 0, groups, n), True)[..., :n]
        ok = ok & chosen[..., None]
        alive = ok.any(-1)
        s = torch.where(ok, s, torch.where(alive[..., None], float("-inf"), 0.0))
        lse = torch.logsumexp(s, -1)  # (B, H, R, n)
        outer = plan.outer[:, :, r0:r1].to(wd)
        if plan.own_lse_slot is not None:
            own = plan.own_lse_slot
            own_lse = lse.gather(-1, groups[..., own:own + 1].clamp(min=0))
            outer = torch.cat([outer[..., :own], torch.where(groups[..., own:own + 1] >= 0, own_lse, float("-inf")),
                               outer[..., own + 1:]], -1)
        per_group = torch.full((B, H, R, n + 1), float("-inf"), dtype=wd, device=call.device)
        per_group = per_group.scatter(-1, torch.where(groups >= 0, groups, n), outer)[..., :n]
        m = per_group.amax(-1, keepdim=True)
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        total = torch.exp(per_group - m).sum(-1, keepdim=True).clamp_min(torch.finfo(wd).tiny)
        log_w = per_group - m - torch.log(total)  # rows without a group: -inf everywhere, never NaN
        weights = torch.exp(s - (lse - log_w)[..., None]) * ok  # (B, H, R, n, P)
        weights = weights.view(B, H, R, n * P)[..., :Lk].reshape(B, call.kv_heads, g * R, Lk)
        outs.append((weights @ v).view(B, H, R, -1))
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
    """The ``gather`` form: runs a method's GroupPlan by gathering each row's groups (work and
    memory traffic proportional to the keys read; CPU and GPU)."""

    name = "gather"

    def can_run(self, call, plan) -> str | None:
        if call.dropout_p > 0:
            return "dropout_p > 0 is not supported"
        return None

    def run(self, call, plan: GroupPlan) -> torch.Tensor:
        return run_plan(call, plan)




class DensePlanEngine(PlanEngine):
    """The ``dense`` form: the same plan from dense score rows (``run_plan_dense``): dense matmul
    work, no per-query copies of keys; for short sequences and checking."""

    name = "dense"

    def run(self, call, plan: GroupPlan) -> torch.Tensor:
        return run_plan_dense(call, plan)


__all__ = ["DensePlanEngine", "GroupPlan", "PlanEngine", "combine", "group_attention", "run_plan", "run_plan_dense",
           "top_groups"]
