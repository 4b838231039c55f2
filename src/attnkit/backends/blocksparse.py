"""The ``blocksparse`` engine: pure PyTorch, exact, on CPU and GPU.

It visits only the non-empty (query-block, key-block) tiles of the pattern's block plan. For a
chunk of query blocks it gathers their key tiles, evaluates the pattern rule only inside those
tiles, and runs an online softmax over chunks of tiles (FlashAttention's recurrence). The
backward pass recomputes the tiles from the saved log-sum-exp instead of storing scores, so
memory stays ``O(L x window)`` for a window pattern and no ``Lq x Lk`` tensor is ever built.
Score modifications (relative bias, softcap...) are differentiated, tensors included, by
re-running them under autograd inside the backward pass.

A self-attention pattern that offers a token order (grid patterns' tiles) runs in it: q, k, v are
moved into the order and the output moved back (:mod:`attnkit.backends.reorder`), so the
tiles visited are compact boxes of the grid (``token_tiling = False`` keeps the call's order).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch

from ..call import AttentionCall
from ..patterns.base import _to_device
from ..patterns.plan import cdiv
from .mask_spec import MaskSpec
from .reorder import Layout, Layouts

# elements of one (q-chunk x tile-chunk) score tensor; several such tensors live at once
SCORE_BUDGET = 1 << 22


@dataclass
class _Tiles:
    """Everything the tile loops need, shared by forward and backward."""

    spec: MaskSpec
    params: dict[str, Any]
    count: torch.Tensor  # (B, H, nQ) long
    index: torch.Tensor  # (B, H, nQ, maxK) long
    full: torch.Tensor  # (B, H, nQ, maxK) bool
    q_len: int
    k_len: int
    block_q: int
    block_k: int
    scale: float
    attn_mask: torch.Tensor | None
    q_chunk: int
    t_chunk: int

    @property
    def num_q_blocks(self) -> int:
        return self.index.shape[2]

    def chunks(self):
        for c0 in range(0, self.num_q_blocks, self.q_chunk):
            yield c0, min(self.num_q_blocks, c0 + self.q_chunk)

    def tile_chunks(self, c0: int, c1: int):
        used = int(self.count[:, :, c0:c1].max()) if self.count.numel() else 0
        for m0 in range(0, used, self.t_chunk):
            yield m0, min(used, m0 + self.t_chunk)


def _pad_blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    """(B, H, L, D) -> (B, H, nBlocks, block, D), zero-padded."""
    B, H, L, D = x.shape
    n = cdiv(L, block)
    if n * block != L:
        x = torch.nn.functional.pad(x, (0, 0, 0, n * block - L))
    return x.view(B, H, n, block, D)


def _scores(t: _Tiles, qb, kb, c0, c1, m0, m1):
    """Raw scores ``(B,H,C,bq,M,bk)``, the keep mask, the gathered tile indices and the index
    grids ``(b, h, q, k)`` for query blocks [c0, c1) x tile slots [m0, m1)."""
    keep, idx, grid, added = _tile_mask(t, c0, c1, m0, m1)
    bi, hi = grid[0][..., 0, 0], grid[1][..., 0, 0]
    kg = kb[bi, hi, idx]  # (B,H,C,M,bk,D)
    s = torch.einsum("bhcqd,bhcmkd->bhcqmk", qb[:, :, c0:c1], kg) * t.scale
    if added is not None:
        s = s + added.to(s.dtype)
    return s, keep, idx, grid


def _tile_mask(t: _Tiles, c0, c1, m0, m1):
    """What ``_scores`` knows without the scores: the keep mask ``(B,H,C,1|bq,M,bk)``, the tile
    indices, the index grids and the float ``attn_mask`` values to add to the scores (or None)."""
    B, H = t.index.shape[:2]
    dev = t.index.device
    idx = t.index[:, :, c0:c1, m0:m1]  # (B,H,C,M)
    bi = torch.arange(B, device=dev).view(B, 1, 1, 1)
    hi = torch.arange(H, device=dev).view(1, H, 1, 1)
    C = idx.shape[2]
    qpos = (torch.arange(c0, c1, device=dev)[:, None] * t.block_q
            + torch.arange(t.block_q, device=dev)).view(1, 1, C, t.block_q, 1, 1)
    kpos = (idx[..., None] * t.block_k + torch.arange(t.block_k, device=dev)).unsqueeze(3)
    slot_ok = (torch.arange(m0, m1, device=dev) < t.count[:, :, c0:c1, None])  # (B,H,C,M)
    keep = slot_ok[:, :, :, None, :, None] & (kpos < t.k_len)  # (B,H,C,1,M,bk)
    b6 = bi.view(B, 1, 1, 1, 1, 1)
    h6 = hi.view(1, H, 1, 1, 1, 1)
    full = t.full[:, :, c0:c1, m0:m1]
    if not bool(full.all()):
        p = t.spec.pattern
        rb = b6 if p.batch else torch.zeros_like(b6)
        rh = h6 if p.heads else torch.zeros_like(h6)
        # rules see in-range positions only (padding rows/columns are dropped or masked anyway)
        rule = p.rule(rb, rh, qpos.clamp(max=t.q_len - 1), kpos.clamp(max=t.k_len - 1), t.params)
        keep = keep & (full[:, :, :, None, :, None] | rule)
    added = None
    if t.attn_mask is not None:
        am = t.attn_mask
        vals = am[b6.clamp(max=am.shape[0] - 1), h6.clamp(max=am.shape[1] - 1),
                  qpos.clamp(max=t.q_len - 1), kpos.clamp(max=t.k_len - 1)]
        if am.dtype == torch.bool:
            keep = keep & vals
        else:
            added = vals
    return keep, idx, (b6, h6, qpos, kpos), added


def _modified(t: _Tiles, s, grid, mod_tensors):
    if t.spec.score_mod is None:
        return s
    return t.spec.score_mod(s, *grid, *mod_tensors)


# exp(x) for x <= 0 whose underflowing tail is cut at e^-80 (~1.8e-35, a normal float): vectorized
# exp on CPU takes a slow path for arguments far below zero (about 7x slower at -100 on the 2-core
# development machines). Terms under e^-80 of the row maximum are below float64 rounding of the sum.
_EXP_FLOOR = -80.0


def exp_below_max(x: torch.Tensor) -> torch.Tensor:
    return torch.exp(x.clamp_min(_EXP_FLOOR))


def _forward(t: _Tiles, q, k, v, mod_tensors):
    wd = q.dtype
    qb, kb, vb = _pad_blocks(q, t.block_q), _pad_blocks(k, t.block_k), _pad_blocks(v, t.block_k)
    B, H, nQ, bq, _ = qb.shape
    out = torch.zeros(B, H, nQ, bq, v.shape[-1], dtype=wd, device=q.device)
    lse = torch.full((B, H, nQ, bq), float("-inf"), dtype=wd, device=q.device)
    for c0, c1 in t.chunks():
        m_run = lse[:, :, c0:c1].clone()
        l_run = torch.zeros_like(m_run)
        acc = out[:, :, c0:c1].clone()
        for m0, m1 in t.tile_chunks(c0, c1):
            s, keep, idx, grid = _scores(t, qb, kb, c0, c1, m0, m1)
            s = _modified(t, s, grid, mod_tensors).masked_fill(~keep, float("-inf"))
            m_new = torch.maximum(m_run, s.amax(dim=(-2, -1)))
            m_safe = torch.where(torch.isfinite(m_new), m_new, torch.zeros_like(m_new))
            p = torch.where(keep, exp_below_max(s - m_safe[..., None, None]), 0.0)
            alpha = torch.exp(m_run - m_safe)
            l_run = l_run * alpha + p.sum(dim=(-2, -1))
            vg = vb[grid[0][..., 0, 0], grid[1][..., 0, 0], idx]
            acc = acc * alpha[..., None] + torch.einsum("bhcqmk,bhcmkd->bhcqd", p, vg)
            m_run = m_new
        out[:, :, c0:c1] = acc / l_run.clamp_min(torch.finfo(wd).tiny)[..., None]
        lse[:, :, c0:c1] = m_run + torch.log(l_run)
    Lq = t.q_len
    return out.view(B, H, nQ * bq, -1)[:, :, :Lq], lse.view(B, H, nQ * bq)[:, :, :Lq]


def _backward(t: _Tiles, q, k, v, out, lse, dout, mod_tensors):
    wd = q.dtype
    qb, kb, vb = _pad_blocks(q, t.block_q), _pad_blocks(k, t.block_k), _pad_blocks(v, t.block_k)
    dob = _pad_blocks(dout, t.block_q)
    B, H, nQ, bq, D = qb.shape
    nK, bk = kb.shape[2], kb.shape[3]
    delta = _pad_blocks((dout * out).sum(-1, keepdim=True), t.block_q)[..., 0]  # (B,H,nQ,bq)
    # rows with no visible key (lse = -inf) and padding rows get +inf, so their p is exactly 0
    lse_safe = torch.nn.functional.pad(torch.where(torch.isfinite(lse), lse, float("inf")),
                                       (0, nQ * bq - t.q_len), value=float("inf")).view(B, H, nQ, bq)
    dq = torch.zeros_like(qb)
    dk = torch.zeros(B * H * nK, bk, D, dtype=wd, device=q.device)
    dv = torch.zeros(B * H * nK, bk, v.shape[-1], dtype=wd, device=q.device)
    dmods = [torch.zeros_like(m) for m in mod_tensors]
    base = (torch.arange(B, device=q.device).view(B, 1, 1, 1) * H
            + torch.arange(H, device=q.device).view(1, H, 1, 1)) * nK
    for c0, c1 in t.chunks():
        do = dob[:, :, c0:c1]
        for m0, m1 in t.tile_chunks(c0, c1):
            raw, keep, idx, grid = _scores(t, qb, kb, c0, c1, m0, m1)
            leaves = []
            if t.spec.score_mod is not None:
                with torch.enable_grad():
                    raw = raw.requires_grad_()
                    leaves = [m.detach().requires_grad_() for m in mod_tensors]
                    s = _modified(t, raw, grid, leaves)
            else:
                s = raw
            p = torch.where(keep, exp_below_max(s.detach() - lse_safe[:, :, c0:c1, :, None, None]), 0.0)
            bi, hi = grid[0][..., 0, 0], grid[1][..., 0, 0]
            kg, vg = kb[bi, hi, idx], vb[bi, hi, idx]
            gidx = (base + idx).reshape(-1)
            dv.index_add_(0, gidx, torch.einsum("bhcqmk,bhcqd->bhcmkd", p, do).reshape(-1, bk, dv.shape[-1]))
            dp = torch.einsum("bhcqd,bhcmkd->bhcqmk", do, vg)
            ds = p * (dp - delta[:, :, c0:c1, :, None, None])
            if t.spec.score_mod is not None:
                grads = torch.autograd.grad(s, [raw, *leaves], ds)
                ds = grads[0]
                for acc, g in zip(dmods, grads[1:]):
                    acc += g
            dq[:, :, c0:c1] += torch.einsum("bhcqmk,bhcmkd->bhcqd", ds, kg) * t.scale
            dk.index_add_(0, gidx, (torch.einsum("bhcqmk,bhcqd->bhcmkd", ds, qb[:, :, c0:c1]) * t.scale)
                          .reshape(-1, bk, D))
    Lq, Lk = t.q_len, t.k_len
    dq = dq.view(B, H, nQ * bq, D)[:, :, :Lq]
    dk = dk.view(B, H, nK * bk, D)[:, :, :Lk]
    dv = dv.view(B, H, nK * bk, -1)[:, :, :Lk]
    return dq, dk, dv, dmods


class _BlockSparseAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tiles: _Tiles, q, k, v, *mod_tensors):
        with torch.no_grad():
            out, lse = _forward(tiles, q, k, v, mod_tensors)
        ctx.tiles = tiles
        ctx.save_for_backward(q, k, v, out, lse, *mod_tensors)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, *mods = ctx.saved_tensors
        dq, dk, dv, dmods = _backward(ctx.tiles, q, k, v, out, lse, dout.to(q.dtype), mods)
        return (None, dq, dk, dv, *dmods)


BLOCK_CHOICES = (32, 64, 128)
TILE_OVERHEAD = 512  # score elements one more tile costs in gathering and bookkeeping (CPU, measured)


def cheapest_block(pattern, q_len: int, k_len: int, device) -> int:
    """The tile size of ``BLOCK_CHOICES`` with the least estimated work for this pattern: computed
    scores plus a per-tile overhead, from the analytic block plans (a pattern without one keeps 128,
    as its generic plan costs an Lq x Lk evaluation). A performance choice only: results do not
    depend on the tile size (tested)."""
    best, best_cost = 128, None
    for b in BLOCK_CHOICES:
        bq, bk = min(b, q_len), min(b, k_len)
        states = pattern._plan(q_len, k_len, bq, bk, device)
        if states is None:
            return 128
        tiles = int((states > 0).sum())
        cost = tiles * (bq * bk + TILE_OVERHEAD)
        if best_cost is None or cost < best_cost:
            best, best_cost = b, cost
    return best


def tiles_for(call: AttentionCall, spec: MaskSpec, block_q: int | None = None,
              block_k: int | None = None) -> _Tiles:
    # tiles never exceed the problem: a 7-token call computes 7x7 tiles, not 128x128 ones
    block = spec.block if spec.block_fixed else cheapest_block(spec.pattern, call.q_len, call.k_len, call.device)
    bq = min(block_q or block, call.q_len)
    bk = min(block_k or block, call.k_len)
    pattern = spec.pattern
    pattern.check_heads(call.batch, call.heads)
    plan = pattern.block_plan(call.q_len, call.k_len, (bq, bk), call.device)
    count, index, full = plan.kv_lists()
    B, H = call.batch, call.heads
    nQ, maxK = index.shape[-2:]
    count = count.expand(B, H, nQ).long()
    index = index.expand(B, H, nQ, maxK).long()
    full = full.expand(B, H, nQ, maxK)
    per_tile = B * H * bq * bk
    t_chunk = max(1, min(maxK, SCORE_BUDGET // per_tile))
    q_chunk = max(1, SCORE_BUDGET // (per_tile * t_chunk))
    params = pattern.params(call.q_len, call.k_len)
    return _Tiles(spec, _to_device(params, call.device), count, index, full, call.q_len, call.k_len,
                  bq, bk, call.scale, call.attn_mask, q_chunk, t_chunk)


def blocksparse_attention(call: AttentionCall, spec: MaskSpec) -> torch.Tensor:
    """Run ``spec`` over ``call`` visiting only the plan's tiles."""
    wd = torch.float64 if call.dtype == torch.float64 else torch.float32
    tiles = tiles_for(call, spec)
    k, v = call.expanded_kv()
    q = call.query.to(wd)
    out = _BlockSparseAttention.apply(tiles, q, k.to(wd), v.to(wd), *spec.mod_tensors)
    return out.to(call.dtype)


class BlockSparseEngine:
    name = "blocksparse"
    token_tiling = True

    def __init__(self):
        self._layouts = Layouts()

    def layout(self, call: AttentionCall, spec: MaskSpec) -> Layout:
        block = (min(spec.block, call.q_len), min(spec.block, call.k_len))
        return self._layouts.get(call, spec, block, self.token_tiling)

    def describe(self, call: AttentionCall, spec: MaskSpec) -> str:
        layout = self.layout(call, spec)
        return f"tiles of {layout.pattern.describe()}: {layout.note}"

    def can_run(self, call: AttentionCall, spec: MaskSpec) -> str | None:
        if call.dropout_p > 0:
            return "dropout_p > 0 is not supported (use backend='dense')"
        if call.attn_mask is not None and call.attn_mask.requires_grad:
            return "attn_mask requires grad, which blocksparse does not differentiate (use backend='dense')"
        return None

    def run(self, call: AttentionCall, spec: MaskSpec) -> torch.Tensor:
        layout = self.layout(call, spec)
        if not layout.reordered:
            return blocksparse_attention(call, spec)
        q, k, v = (layout.into_order(t) for t in (call.query, call.key, call.value))
        out = blocksparse_attention(replace(call, query=q, key=k, value=v), replace(spec, pattern=layout.pattern))
        return layout.out_of_order(out)
