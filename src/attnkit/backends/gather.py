"""The ``gather`` engine: per-query key-block selections, computed on the kept blocks only.

Dynamic methods such as MoBA (Lu et al. 2025, arXiv 2502.13189) and Kinetics pick key blocks
*per query*: their pattern is ``BlockSelection(tiles, block_q=1, block_k=C)``, often AND-ed with
the causal rule. On 128x128 tiles nearly every tile is partial (neighbouring queries choose
differently), so the tile engines compute about as much as dense attention. The official MoBA
kernel (MoonshotAI/MoBA, ``moba_efficient.py``) avoids this with a varlen gather of the queries
that chose each key block. This engine takes the other side of the same idea, in plain PyTorch:
for a chunk of queries it gathers, for each query, the keys and values of its selected blocks
``(B, H, rows, blocks x C, D)`` and runs one exact softmax over them (the causal cut inside the
query's own block and the key range are masked there). Work and memory follow the kept blocks
(padded to the largest count in the chunk); no ``Lq x Lk`` tensor is built. Query chunks keep
the gathered block under ``GATHER_BUDGET`` elements.

The backward pass is a custom autograd function: it recomputes each chunk's probabilities from
the saved log-sum-exp and scatters the key / value gradients back with ``index_add_`` (GQA heads
add into their shared kv head). Rows with no visible key give zeros (and zero gradients).
Inputs in bf16 / fp16 / fp32 compute in float32, float64 in float64.

Runs only such patterns (``can_run`` names what it got otherwise): a ``BlockSelection`` with
``block_q = 1`` (any ``key_shift``), alone or ``& Full(causal=...)``; no score modification,
``attn_mask`` or dropout.
"""

from __future__ import annotations

import torch

from ..call import AttentionCall
from ..patterns.base import Intersection, Pattern
from ..patterns.interval import Full
from ..patterns.plan import cdiv
from ..patterns.selection import BlockSelection
from .mask_spec import MaskSpec

# elements of one gathered key (or value) block (B, H, rows, kept keys, D) built at once
GATHER_BUDGET = 1 << 22


def per_query_parts(pattern: Pattern) -> tuple[BlockSelection | None, Full | None, str | None]:
    """``(selection, full_or_None, None)`` when ``pattern`` is a per-query block selection this
    engine runs, else ``(None, None, reason)``."""
    parts = [pattern.a, pattern.b] if isinstance(pattern, Intersection) else [pattern]
    sels = [p for p in parts if isinstance(p, BlockSelection)]
    fulls = [p for p in parts if type(p) is Full]
    if len(sels) != 1 or len(sels) + len(fulls) != len(parts):
        return None, None, (f"runs a per-query BlockSelection (block_q=1), optionally & the causal rule; "
                            f"got {pattern.describe()}")
    sel = sels[0]
    if sel.block_q != 1:
        return None, None, (f"runs per-query selections (block_q=1); got block_q={sel.block_q} "
                            f"(use backend='blocksparse')")
    return sel, (fulls[0] if fulls else None), None


class _Plan:
    """Per-call facts shared by forward and backward."""

    def __init__(self, call: AttentionCall, sel: BlockSelection, full: Full | None):
        self.tiles = sel.tiles.to(call.device)  # (Bp, Hp, Lq, nK)
        self.bk, self.shift = sel.block_k, sel.key_shift
        self.q_len, self.k_len = call.q_len, call.k_len
        self.causal = full is not None and full.causal
        self.offset = call.k_len - call.q_len
        self.scale, self.group = call.scale, call.group
        self.B, self.H = call.batch, call.heads
        self.n_blocks = cdiv(call.k_len + self.shift, self.bk)

    def chunks(self, width: int):
        """``(r0, r1, ids, keep)``: query rows [r0, r1), their selected block ids ``(B, H, R, M)``
        and which gathered keys are visible ``(B, H, R, M * bk)``; ``M`` is the chunk's largest
        count. ``width``: the larger of D and Dv (sizes the chunk)."""
        counts = self.tiles.sum(-1).amax(dim=(0, 1))  # (Lq,) the most blocks any (b, h) keeps per row
        unit = self.B * self.H * self.bk * width
        r0 = 0
        while r0 < self.q_len:
            rows = max(1, GATHER_BUDGET // (unit * max(1, int(counts[r0]))))
            while True:
                m = max(1, int(counts[r0:r0 + rows].max()))
                fit = max(1, GATHER_BUDGET // (unit * m))
                if fit >= rows:
                    break
                rows = fit
            r1 = min(self.q_len, r0 + rows)
            yield (r0, r1, *self._ids(r0, r1, int(counts[r0:r1].max())))
            r0 = r1

    def _ids(self, r0: int, r1: int, m: int):
        t = self.tiles[:, :, r0:r1]
        dev = t.device
        if m == 0:
            shape = (self.B, self.H, r1 - r0, 0)
            return torch.zeros(shape, dtype=torch.long, device=dev), torch.zeros(shape, dtype=torch.bool, device=dev)
        vals, ids = t.to(torch.int8).topk(m, dim=-1)  # the selected blocks first
        ids = ids.expand(self.B, self.H, -1, -1)
        kpos = ids[..., None] * self.bk - self.shift + torch.arange(self.bk, device=dev)  # (B,H,R,M,bk)
        keep = (vals > 0).expand(self.B, self.H, -1, -1)[..., None] & (kpos >= 0) & (kpos < self.k_len)
        if self.causal:
            qa = torch.arange(r0, r1, device=dev).view(1, 1, -1, 1, 1) + self.offset
            keep = keep & (kpos <= qa)
        return ids, keep.flatten(3)

    def flat_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """Block ids ``(B, H, R, M)`` -> rows of the ``(B * Hk * nBlocks, bk, D)`` block table."""
        hk = self.H // self.group
        b = torch.arange(self.B, device=ids.device).view(-1, 1, 1, 1)
        h = torch.arange(self.H, device=ids.device).view(1, -1, 1, 1) // self.group
        return ((b * hk + h) * self.n_blocks + ids).reshape(-1)

    def blocks(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, Hk, Lk, D)`` -> ``(B * Hk * nBlocks, bk, D)``, zero-padded (key_shift in front)."""
        B, Hk, L, D = x.shape
        x = torch.nn.functional.pad(x, (0, 0, self.shift, self.n_blocks * self.bk - L - self.shift))
        return x.reshape(B * Hk * self.n_blocks, self.bk, D)

    def gather(self, table: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Gathered keys (or values) ``(B, H, R, M * bk, D)``."""
        B, H, R, M = ids.shape
        return table[self.flat_ids(ids)].view(B, H, R, M * self.bk, table.shape[-1])


def _probs(plan: _Plan, q, kg, keep, lse=None):
    """Scaled scores -> probabilities (with the given log-sum-exp, else a fresh one)."""
    s = torch.einsum("bhrd,bhrnd->bhrn", q, kg) * plan.scale
    s = s.masked_fill(~keep, float("-inf"))
    if lse is None:
        lse = torch.logsumexp(s, dim=-1)  # -inf for rows with no visible key
    safe = torch.where(torch.isfinite(lse), lse, torch.full_like(lse, float("inf")))
    return torch.exp(s - safe[..., None]), lse  # exp(-inf) = 0 off the mask and on empty rows


class _GatherAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, plan: _Plan, q, k, v):
        kt, vt = plan.blocks(k), plan.blocks(v)
        out = q.new_zeros(*q.shape[:3], v.shape[-1])
        lse = q.new_full(q.shape[:3], float("-inf"))
        for r0, r1, ids, keep in plan.chunks(max(q.shape[-1], v.shape[-1])):
            if ids.shape[-1] == 0:
                continue
            p, lse[:, :, r0:r1] = _probs(plan, q[:, :, r0:r1], plan.gather(kt, ids), keep)
            out[:, :, r0:r1] = torch.einsum("bhrn,bhrnd->bhrd", p, plan.gather(vt, ids))
        ctx.plan = plan
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, dout):
        plan = ctx.plan
        q, k, v, out, lse = ctx.saved_tensors
        dout = dout.to(q.dtype)
        kt, vt = plan.blocks(k), plan.blocks(v)
        dq, dkt, dvt = torch.zeros_like(q), torch.zeros_like(kt), torch.zeros_like(vt)
        delta = (dout * out).sum(-1)  # (B, H, Lq)
        for r0, r1, ids, keep in plan.chunks(max(q.shape[-1], v.shape[-1])):
            if ids.shape[-1] == 0:
                continue
            qc, do = q[:, :, r0:r1], dout[:, :, r0:r1]
            kg, vg = plan.gather(kt, ids), plan.gather(vt, ids)
            p, _ = _probs(plan, qc, kg, keep, lse[:, :, r0:r1])
            ds = p * (torch.einsum("bhrd,bhrnd->bhrn", do, vg) - delta[:, :, r0:r1, None])
            dq[:, :, r0:r1] = torch.einsum("bhrn,bhrnd->bhrd", ds, kg) * plan.scale
            flat = plan.flat_ids(ids)
            dvt.index_add_(0, flat, (p[..., None] * do[:, :, :, None]).reshape(-1, plan.bk, v.shape[-1]))
            dkt.index_add_(0, flat, (ds[..., None] * (qc * plan.scale)[:, :, :, None])
                           .reshape(-1, plan.bk, q.shape[-1]))
        B, Hk, Lk = k.shape[:3]
        dk = dkt.view(B, Hk, -1, k.shape[-1])[:, :, plan.shift:plan.shift + Lk]
        dv = dvt.view(B, Hk, -1, v.shape[-1])[:, :, plan.shift:plan.shift + Lk]
        return None, dq, dk, dv


class GatherEngine:
    """Exact attention on a per-query block selection, gathering each query's kept key blocks."""

    name = "gather"

    def can_run(self, call: AttentionCall, spec: MaskSpec) -> str | None:
        _, _, reason = per_query_parts(spec.pattern)
        if reason is not None:
            return reason
        if spec.score_mod is not None:
            return "a score modification is not supported (use backend='blocksparse')"
        if call.attn_mask is not None:
            return "attn_mask is not supported (use backend='blocksparse')"
        if call.dropout_p > 0:
            return f"dropout_p={call.dropout_p} is not supported (use backend='dense')"
        return None

    def run(self, call: AttentionCall, spec: MaskSpec) -> torch.Tensor:
        sel, full, reason = per_query_parts(spec.pattern)
        if reason is not None:
            raise ValueError(f"gather engine: {reason}")
        sel.check(call.q_len, call.k_len)
        sel.check_heads(call.batch, call.heads)
        wd = torch.float64 if call.dtype == torch.float64 else torch.float32
        plan = _Plan(call, sel, full)
        out = _GatherAttention.apply(plan, call.query.to(wd), call.key.to(wd), call.value.to(wd))
        return out.to(call.dtype)
