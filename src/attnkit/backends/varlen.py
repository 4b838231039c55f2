"""The ``varlen`` engine: per-query key-block selections computed on the kept blocks only (named
after MoBA's varlen path; not hcam/landmark's two-level ``gather`` form).

Dynamic methods such as MoBA (Lu et al. 2025, arXiv 2502.13189) and Kinetics pick key blocks
*per query*: their pattern is ``BlockSelection(tiles, block_q=1, block_k=C)``, often AND-ed with
the causal rule. On 128x128 tiles nearly every tile is partial (neighbouring queries choose
differently), so the tile engines compute about as much as dense attention. The official MoBA
code (github.com/MoonshotAI/MoBA, ``moba/moba_efficient.py``, ``moba_attn_varlen``) instead
gathers, for each key block, the queries that selected it (varlen FlashAttention) and merges the
partial results by log-sum-exp; this engine takes that idea (not the code) to plain PyTorch. For
a chunk of query rows it lists the selected (query, key block) pairs sorted by key block (one kv
head: GQA heads share it) and cuts each block's queries into *pieces* of up to ``P`` rows; a
piece is one small GEMM of its gathered queries ``(P, D)`` with its key block ``(C, D)``, masked
by the key range, ``key_shift`` and the causal cut inside a query's own block. Each query row
appears in one piece per kept block, and its pieces are merged with an online softmax. Work and
memory follow the kept blocks; no ``Lq x Lk`` tensor is built, and each batch of pieces stays
under ``VARLEN_BUDGET`` elements.

The backward pass is a custom autograd function: it recomputes each piece's probabilities from
the saved log-sum-exp and adds the gradients back with ``index_add_`` (queries by row, keys and
values by block). Rows with no visible key give zeros (and zero gradients). Inputs in bf16 / fp16 /
fp32 compute in float32, float64 in float64.

Runs only such patterns (``can_run`` names what it got otherwise): a ``BlockSelection`` with
``block_q = 1`` (any ``key_shift``), alone or ``& Full(causal=...)``; no score modification,
``attn_mask`` or dropout.

``backend="auto"`` takes it on CPU where it beats ``blocksparse``. A kept (query, key block) pair
costs it about ``block_k + PAIR_KEYS`` key-equivalents (the gathered query row and its output
added back cost as much as ``PAIR_KEYS`` keys) at about half blocksparse's cost per key, and
blocksparse visits about every visible key of a per-query selection; so auto takes varlen when
the kept share of the visible keys is at most ``2 * block_k / (block_k + PAIR_KEYS)``: 15 % for
blocks of 4 keys, 29 % for 8, 50 % for 16, 80 % for 32, any share for 64 or more. (Fitted on 2 CPU
cores, moba at L = 1024 and 4096, block_k 1 to 256, 5 % to dense: where the rule takes varlen it
took 0.1 to 0.9 of blocksparse's forward + backward time; where it does not, 0.3 to 8 times. One
block holding every key, moba's default chunk_size on calls up to 4096 keys, is about even.) On
GPUs flex stays first and varlen runs only when named, until measured there.
"""

from __future__ import annotations

import torch

from ..call import AttentionCall
from ..errors import BackendUnavailableError
from ..patterns.base import Intersection, Pattern
from ..patterns.interval import Full
from ..patterns.plan import cdiv
from ..patterns.selection import BlockSelection
from .blocksparse import exp_below_max
from .mask_spec import MaskSpec

# elements of one batch of pieces: gathered queries and key blocks (pieces x (P + C) x D), scores.
# 1 << 22 (blocksparse's SCORE_BUDGET) runs as fast as 1 << 24 on CPU with half the peak memory
# (moba, L = 16384, forward + backward: 161 vs 343 MiB)
VARLEN_BUDGET = 1 << 22
# what one kept (query, key block) pair costs beyond its keys, in keys (CPU; see the docstring)
PAIR_KEYS = 48


def per_query_parts(pattern: Pattern) -> tuple[BlockSelection | None, Full | None, str | None]:
    """``(selection, full_or_None, None)`` when ``pattern`` is a per-query block selection this
    engine runs, else ``(None, None, reason)``."""
    parts = [pattern.a, pattern.b] if isinstance(pattern, Intersection) else [pattern]
    sels = [p for p in parts if isinstance(p, BlockSelection)]
    fulls = [p for p in parts if type(p) is Full]
    if len(sels) != 1 or len(sels) + len(fulls) != len(parts):
        return None, None, (f"pattern {pattern.describe()}: varlen runs a per-query BlockSelection "
                            f"(block_q=1), alone or & Full(causal=...); use backend='blocksparse'")
    sel = sels[0]
    if sel.block_q != 1:
        return None, None, (f"block_q={sel.block_q}: varlen runs per-query selections only (block_q=1); "
                            f"use backend='blocksparse'")
    return sel, (fulls[0] if fulls else None), None


class _Plan:
    """Per-call facts shared by forward and backward. Work goes in *pieces*: up to ``P`` (query
    row, key block) pairs of one key block (one kv head), so a piece is a small GEMM
    ``(P, D) x (D, bk)``; each query row appears in one piece per selected block."""

    def __init__(self, call: AttentionCall, sel: BlockSelection, full: Full | None, width: int = 0):
        sel.check(call.q_len, call.k_len)
        sel.check_heads(call.batch, call.heads)
        self.tiles = sel.tiles.to(call.device)  # (Bp, Hp, Lq, nK)
        self.shift = sel.key_shift
        self.bk = min(sel.block_k, call.k_len + self.shift)  # one block longer than the keys: no padding
        self.q_len, self.k_len = call.q_len, call.k_len
        self.causal = full is not None and full.causal
        self.offset = call.k_len - call.q_len
        self.scale, self.group = call.scale, call.group
        self.B, self.H = call.batch, call.heads
        self.n_blocks = cdiv(call.k_len + self.shift, self.bk)
        self.first = torch.arange(self.n_blocks, device=call.device) * self.bk - self.shift  # each block's first key
        self.width = max(width, self.bk)

    def row_chunks(self):
        """Query rows ``[r0, r1)`` whose (row, block) pairs, gathered, and whose tile rows
        ``(B, H, R, nBlocks)`` stay under the budget."""
        spread = self.B * self.H // (self.tiles.shape[0] * self.tiles.shape[1])
        total = torch.cumsum(self.live(0, self.q_len).sum(-1).sum(dim=(0, 1)) * spread, 0)  # pairs up to each row
        step = max(1, VARLEN_BUDGET // (2 * self.width))  # pairs per chunk (padding may double them)
        most_rows = max(1, VARLEN_BUDGET // (self.B * self.H * self.n_blocks))
        r0 = 0
        while r0 < self.q_len:
            base = int(total[r0 - 1]) if r0 else 0
            r1 = int(torch.searchsorted(total, base + step, right=True))
            r1 = min(self.q_len, r0 + most_rows, max(r1, r0 + 1))
            yield r0, r1
            r0 = r1

    def live(self, r0: int, r1: int) -> torch.Tensor:
        """Selected blocks of rows ``[r0, r1)`` ``(Bp, Hp, R, nBlocks)`` that hold a visible key
        (a selection may name blocks wholly past the causal cut, e.g. Kinetics' dense rows)."""
        t = self.tiles[:, :, r0:r1]
        if self.causal:
            qa = torch.arange(r0, r1, device=t.device)[:, None] + self.offset
            t = t & (self.first <= qa)
        return t

    def kept_share(self) -> float:
        """Kept (query, key) pairs over the pairs the causal rule leaves visible (0 if none)."""
        end = (self.first + self.bk).clamp(max=self.k_len)
        if self.causal:  # keys of each block that each query row sees: (Lq, nBlocks)
            end = torch.minimum(end, torch.arange(self.q_len, device=end.device)[:, None] + self.offset + 1)
        keys = (end - self.first.clamp(min=0)).clamp(min=0).expand(self.q_len, -1)
        kept = float((self.tiles.sum(dim=(0, 1)) * keys).sum()) / (self.tiles.shape[0] * self.tiles.shape[1])
        visible = float(keys.sum())
        return kept / visible if visible else 0.0

    def pieces(self, r0: int, r1: int):
        """For rows ``[r0, r1)``: rows ``(n, P)`` of the chunk's ``(B * H * R)`` queries (-1:
        padding) and the key block ``(n,)`` of ``(B * Hk * nBlocks)`` of each piece, in batches
        whose gathered blocks stay under the budget; empty when nothing is selected."""
        B, H, g, R, nK = self.B, self.H, self.group, r1 - r0, self.n_blocks
        t = self.live(r0, r1).expand(B, H, R, nK).reshape(B, H // g, g, R, nK)
        b, hk, c, hg, i = t.permute(0, 1, 4, 2, 3).nonzero(as_tuple=True)  # sorted by key block
        if b.numel() == 0:
            return []
        kid = (b * (H // g) + hk) * nK + c
        qrow = (b * H + hk * g + hg) * R + i
        counts = torch.bincount(kid, minlength=B * (H // g) * nK)
        used = counts[counts > 0]
        P = min(64, 1 << max(0, int(cdiv(int(used.sum()), used.numel()) - 1).bit_length()))
        n_pieces = torch.div(counts + P - 1, P, rounding_mode="floor")
        rank = torch.arange(kid.numel(), device=kid.device) - (torch.cumsum(counts, 0) - counts)[kid]
        piece = (torch.cumsum(n_pieces, 0) - n_pieces)[kid] + torch.div(rank, P, rounding_mode="floor")
        rows = torch.full((int(n_pieces.sum()), P), -1, dtype=torch.long, device=kid.device)
        rows[piece, rank % P] = qrow
        blocks = torch.repeat_interleave(torch.arange(counts.numel(), device=kid.device), n_pieces)
        step = max(1, VARLEN_BUDGET // ((self.bk + P) * self.width))
        return [(rows[j:j + step], blocks[j:j + step]) for j in range(0, blocks.numel(), step)]

    def keep(self, rows: torch.Tensor, blocks: torch.Tensor, r0: int, r1: int) -> torch.Tensor:
        """Visible (row, key) pairs of the pieces ``(n, P, bk)`` of rows ``[r0, r1)``."""
        kpos = self.first[blocks % self.n_blocks][:, None] + torch.arange(self.bk, device=rows.device)
        keep = (rows >= 0)[:, :, None] & ((kpos >= 0) & (kpos < self.k_len))[:, None, :]
        if self.causal:
            qa = rows % (r1 - r0) + r0 + self.offset
            keep = keep & (kpos[:, None, :] <= qa[:, :, None])
        return keep

    def blocks(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, Hk, Lk, D)`` -> ``(B * Hk * nBlocks, bk, D)``, zero-padded (key_shift in front)."""
        B, Hk, L, D = x.shape
        x = torch.nn.functional.pad(x, (0, 0, self.shift, self.n_blocks * self.bk - L - self.shift))
        return x.reshape(B * Hk * self.n_blocks, self.bk, D)


def _scores(plan: _Plan, qc, kt, rows, blocks, r0, r1):
    """Scaled scores ``(n, P, bk)`` of the pieces, their keep mask and the gathered queries and keys."""
    qp, kp = qc[rows.clamp(min=0)], kt[blocks]
    s = torch.bmm(qp, kp.transpose(1, 2)) * plan.scale
    return s, plan.keep(rows, blocks, r0, r1), qp, kp


def _rows(x: torch.Tensor, r0: int, r1: int) -> torch.Tensor:
    """Query rows ``[r0, r1)`` of ``(B, H, L, D)`` as ``(B * H * R, D)``."""
    return x[:, :, r0:r1].reshape(-1, x.shape[-1])


class _VarlenAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, plan: _Plan, q, k, v):
        kt, vt = plan.blocks(k), plan.blocks(v)
        B, H, Lq, Dv = *q.shape[:3], v.shape[-1]
        out = q.new_zeros(B, H, Lq, Dv)
        lse = q.new_full((B, H, Lq), float("-inf"))
        for r0, r1 in plan.row_chunks():
            qc = _rows(q, r0, r1)
            m_run = q.new_full(qc.shape[:1], float("-inf"))  # online softmax over batches of pieces
            l_run, acc = torch.zeros_like(m_run), q.new_zeros(qc.shape[0], Dv)
            for rows, blocks in plan.pieces(r0, r1):
                s, keep, _, _ = _scores(plan, qc, kt, rows, blocks, r0, r1)
                flat = rows.clamp(min=0)
                row_max = s.masked_fill(~keep, float("-inf")).amax(-1)
                m_new = m_run.scatter_reduce(0, flat.reshape(-1), row_max.reshape(-1), "amax")
                m_safe = torch.where(torch.isfinite(m_new), m_new, torch.zeros_like(m_new))
                p = torch.where(keep, exp_below_max(s - m_safe[flat][..., None]), 0.0)  # 0 on padding slots
                alpha = torch.exp(m_run - m_safe)
                l_run = (l_run * alpha).index_add_(0, flat.reshape(-1), p.sum(-1).reshape(-1))
                acc = (acc * alpha[:, None]).index_add_(0, flat.reshape(-1), torch.bmm(p, vt[blocks]).reshape(-1, Dv))
                m_run = m_new
            out[:, :, r0:r1] = (acc / l_run.clamp_min(torch.finfo(q.dtype).tiny)[:, None]).view(B, H, -1, Dv)
            lse[:, :, r0:r1] = (m_run + torch.log(l_run)).view(B, H, -1)  # -inf for rows seeing nothing
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
        delta = (dout * out).sum(-1, keepdim=True)
        for r0, r1 in plan.row_chunks():
            qc, doc, dc, lc = (_rows(x, r0, r1) for x in (q, dout, delta, lse.unsqueeze(-1)))
            dqc = torch.zeros_like(qc)
            for rows, blocks in plan.pieces(r0, r1):
                s, keep, qp, kp = _scores(plan, qc, kt, rows, blocks, r0, r1)
                flat = rows.clamp(min=0)
                p = torch.where(keep, exp_below_max(s - lc[flat]), 0.0)  # rows seeing nothing keep nothing
                dop = doc[flat]
                dvt.index_add_(0, blocks, torch.bmm(p.transpose(1, 2), dop))
                ds = p * (torch.bmm(dop, vt[blocks].transpose(1, 2)) - dc[flat])
                dqc.index_add_(0, flat.reshape(-1), (torch.bmm(ds, kp) * plan.scale).reshape(-1, qc.shape[-1]))
                dkt.index_add_(0, blocks, torch.bmm(ds.transpose(1, 2), qp) * plan.scale)
            dq[:, :, r0:r1] = dqc.view(*q.shape[:2], -1, q.shape[-1])
        B, Hk, Lk = k.shape[:3]
        dk = dkt.view(B, Hk, -1, k.shape[-1])[:, :, plan.shift:plan.shift + Lk]
        dv = dvt.view(B, Hk, -1, v.shape[-1])[:, :, plan.shift:plan.shift + Lk]
        return None, dq, dk, dv


class VarlenEngine:
    """Exact attention on a per-query block selection, gathering each query's kept key blocks."""

    name = "varlen"

    def can_run(self, call: AttentionCall, spec: MaskSpec) -> str | None:
        _, _, reason = per_query_parts(spec.pattern)
        if reason is not None:
            return reason
        if spec.score_mod is not None:
            return ("score_mod: varlen runs selections without a score modification (this one adds one); "
                    "use backend='blocksparse'")
        if call.attn_mask is not None:
            return (f"attn_mask: varlen runs attn_mask=None only (got a {call.attn_mask.dtype} mask); "
                    "use backend='blocksparse'")
        if call.dropout_p > 0:
            return f"dropout_p={call.dropout_p}: varlen runs dropout_p=0 only; use backend='dense'"
        return None

    def auto_skip(self, call: AttentionCall, spec: MaskSpec) -> str | None:
        if call.device.type != "cpu":
            return (f"auto takes varlen on CPU only (its cost rule is measured there); on "
                    f"{call.device.type} it runs only when named (backend='varlen')")
        sel, full, _ = per_query_parts(spec.pattern)
        plan = _Plan(call, sel, full)
        share, most = plan.kept_share(), 2 * plan.bk / (plan.bk + PAIR_KEYS)
        if share > most:
            return (f"this selection keeps {share:.0%} of the visible keys in blocks of {plan.bk}, where "
                    f"blocksparse is faster on CPU (auto takes varlen up to 2 * block_k / (block_k + "
                    f"{PAIR_KEYS}) = {most:.0%}); varlen runs only when named (backend='varlen')")
        return None

    def run(self, call: AttentionCall, spec: MaskSpec) -> torch.Tensor:
        sel, full, reason = per_query_parts(spec.pattern)
        if reason is not None:
            raise BackendUnavailableError(f"varlen cannot run this call: {reason}")
        wd = torch.float64 if call.dtype == torch.float64 else torch.float32
        plan = _Plan(call, sel, full, max(call.query.shape[-1], call.value.shape[-1]))
        out = _VarlenAttention.apply(plan, call.query.to(wd), call.key.to(wd), call.value.to(wd))
        return out.to(call.dtype)
