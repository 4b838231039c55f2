"""S2-Attention (Lin et al. 2024, arXiv 2407.17678): heterogeneous context sharding among heads.

Positions are cut into sparse blocks of ``B`` tokens; ``qb = qa // B`` is the block of a query
(``qa`` its bottom-right aligned position ``q + Lk - Lq``) and ``kb = k // B`` that of a key. Every
head keeps a local band of blocks plus one block in every ``S = vert_stride`` ("vertical"
blocks); heads differ in which residue class they keep, so the union over heads covers the context.

- ``absolute`` vertical positions (default when causal; KV-cache friendly)::

      local(qb, kb) = qb - kb < left  and  kb - qb < right
      vertical(h, kb) = (kb + shift_h) mod S == 0,   shift_h = hk * step + offset

- ``relative`` vertical positions (default when noncausal; the same for every sparse head)::

      dl = max(0, qb - kb - left + 1),  dr = max(0, kb - qb - right + 1)
      visible(qb, kb) = (dl + dr) mod S == 0        (inside the band dl = dr = 0: kept)

- causal: also ``k <= qa`` (and ``right = 1``: the current block only, as in the official code).

``hk = h // (H // Hkv)`` is the kv head of query head ``h``: the heads of a GQA group share one
pattern. The last ``num_dense_heads`` kv heads are dense (stride 1). ``step`` defaults to
``max(1, int(S / H))`` with ``H`` the number of query heads, so with ``H >= S`` the kv heads
``0 .. S-1`` cover every residue. ``homo_head`` gives every head the pattern of head 0.

Confirmed against the official code, linxihui/dkernel @ 0d4e90e, ``dkernel/utils.py``
``get_sparse_attn_mask`` (block mask, token causal mask, the head sliding step computed from the
query-head count, per-kv-head patterns repeated over the GQA group, dense heads last,
``vert_position_type`` defaulting to absolute for causal and relative for bidirectional,
``local_blocks`` as ``(left, right)`` with ``right = 1`` forced when causal) and
``dkernel/interface.py`` ``LocalStrideSparseAttention`` (``local_blocks >= 1``). Differences, on
purpose: any ``block >= 1`` is accepted (the official Triton kernel wants a power of two >= 16),
and Lq != Lk places queries bottom-right (the official ``past_len`` convention for causal; for
noncausal cross-attention the official code takes explicit start positions instead).
"""

from __future__ import annotations

import torch

from ..errors import OptionError
from .base import Pattern, _to_device
from .tiles import floor_mod, key_tiles, query_tiles, span, span_present, states

VERT_POSITIONS = ("absolute", "relative")


class S2(Pattern):
    """Per-head strided + local block pattern (see module doc). Build it with :func:`s2`."""

    def __init__(self, *, heads: int, kv_heads: int, block: int, left: int, right: int, stride: int,
                 causal: bool, relative: bool, homo_head: bool, num_dense_heads: int, step: int,
                 offset: int):
        self.block, self.left, self.right, self.vert_stride = block, left, right, stride
        self.causal, self.relative, self.homo_head = causal, relative, homo_head
        self.num_dense_heads = num_dense_heads
        kv_head = torch.zeros(1, dtype=torch.long) if homo_head else torch.arange(heads) // (heads // kv_heads)
        sparse = kv_head < kv_heads - num_dense_heads
        self.strides = torch.where(sparse, stride, 1)
        self.shifts = torch.zeros_like(kv_head) if relative else (kv_head * step + offset) % stride
        same = bool((self.strides == self.strides[0]).all() and (self.shifts == self.shifts[0]).all())
        if same:
            self.strides, self.shifts = self.strides[:1], self.shifts[:1]
        self.heads = None if same else heads

    def params(self, q_len, k_len):
        return {"offset": k_len - q_len, "block": self.block, "left": self.left,
                "right": 1 if self.causal else self.right, "causal": self.causal,
                "relative": self.relative, "stride": self.strides, "shift": self.shifts}

    def rule(self, b, h, q, k, p):
        qa = q + p["offset"]
        qb, kb = torch.div(qa, p["block"], rounding_mode="floor"), torch.div(k, p["block"], rounding_mode="floor")
        stride = p["stride"][h]
        if p["relative"]:
            dl = (qb - kb - p["left"] + 1).clamp(min=0)
            dr = (kb - qb - p["right"] + 1).clamp(min=0)
            keep = floor_mod(dl + dr, stride) == 0
        else:
            local = (qb - kb < p["left"]) & (kb - qb < p["right"])
            keep = local | (floor_mod(kb + p["shift"][h], stride) == 0)
        return keep & (k <= qa) if p["causal"] else keep

    def _plan(self, q_len, k_len, block_q, block_k, device):
        p = _to_device(self.params(q_len, k_len), device)
        qf, ql = (x[:, None] for x in query_tiles(q_len, k_len, block_q, device))
        ks, ke = key_tiles(k_len, block_k, device)
        tiles = _relative_tiles if p["relative"] else _absolute_tiles
        present, full = tiles(p, qf, ql, ks, ke, p["stride"].view(-1, 1, 1), p["shift"].view(-1, 1, 1))
        return states(present, full).unsqueeze(0)

    def describe(self):
        mode = "relative" if self.relative else "absolute"
        causal = ", causal" if self.causal else ""
        dense = f", {self.num_dense_heads} dense" if self.num_dense_heads else ""
        return (f"s2(block={self.block}, local=({self.left}, {self.right}), stride={self.vert_stride}, "
                f"{mode}{dense}{causal})")


def _absolute_tiles(p, qf, ql, ks, ke, stride, shift):
    """Present / full tiles of ``local | vertical`` (exact; see ``S2`` for the rule).

    Present: the local interval meets the tile, or a vertical block lies in ``[ks, kmax]``.
    Full: every key outside the keys all rows see locally is vertical (and, causal, ``ke <= qf``);
    with S >= 2 that means each uncovered stretch sits inside one vertical block."""
    B, causal = p["block"], p["causal"]

    def bounds(qa):
        qb = torch.div(qa, B, rounding_mode="floor")
        lo, hi = (qb - p["left"] + 1) * B, (qb + p["right"]) * B - 1
        return lo, (torch.minimum(hi, qa) if causal else hi)

    local = span(bounds, qf, ql)
    kmax = torch.minimum(ke, ql) if causal else ke.expand(qf.shape[0], -1)
    kb_lo, kb_hi = ks // B, torch.div(kmax, B, rounding_mode="floor")
    first_vertical = kb_lo + floor_mod(-(kb_lo + shift), stride)
    present = span_present(local, ks, ke) | ((ks <= kmax) & (first_vertical <= kb_hi))

    def all_vertical(a, b):
        ba, bb = torch.div(a, B, rounding_mode="floor"), torch.div(b, B, rounding_mode="floor")
        return (a > b) | (stride == 1) | ((ba == bb) & (floor_mod(ba + shift, stride) == 0))

    full = (all_vertical(ks, torch.minimum(ke, local.lo_last - 1))
            & all_vertical(torch.maximum(ks, local.hi_first + 1), ke))
    if causal:
        full = full & (ke <= qf)
    return present, full


def _relative_tiles(p, qf, ql, ks, ke, stride, _shift):
    """Present / full tiles of the relative rule (exact). A tile's block offsets ``d = qb - kb``
    fill the whole range ``[a, b]``; visible offsets are the band ``[1 - right, left - 1]`` and
    isolated stripes beyond it (two neighbours are never both stripes when S >= 2)."""
    B, L, R, causal = p["block"], p["left"], p["right"], p["causal"]
    qbf, qbl = (torch.div(x, B, rounding_mode="floor") for x in (qf, ql))
    kbs, kbe = ks // B, ke // B
    a, b = qbf - kbe, qbl - kbs

    def band_meets(lo, hi):
        return torch.maximum(lo, torch.full_like(lo, 1 - R)) <= torch.minimum(hi, torch.full_like(hi, L - 1))

    def stripe_in(lo, hi, edge):  # some d in [lo, hi], d >= edge, (d - edge + 1) % S == 0
        lo = torch.clamp(lo, min=edge)
        return lo + floor_mod(-(lo - edge + 1), stride) <= hi

    if causal:  # d >= 1 pairs are causal already; d == 0 needs one pair with k <= qa
        lo = torch.clamp(a, min=1)
        same_block = (torch.maximum(qbf, kbs) <= torch.minimum(qbl, kbe)) & (ks <= ql)
        present = band_meets(lo, b) | stripe_in(lo, b, L) | same_block
    else:
        present = band_meets(a, b) | stripe_in(a, b, L) | stripe_in(-b, -a, R)
    right = torch.clamp(a, min=L)
    right_ok = (right > b) | (stride == 1) | ((right == b) & (floor_mod(b - L + 1, stride) == 0))
    left = torch.clamp(b, max=-R)
    left_ok = (a > left) | (stride == 1) | ((a == left) & (floor_mod(-a - R + 1, stride) == 0))
    full = right_ok & left_ok
    if causal:
        full = full & (ke <= qf)
    return present, full


def s2(heads: int, *, kv_heads: int | None = None, sparse_block_size: int = 64,
       local_blocks: int | tuple[int, int] = 16, vert_stride: int = 8, causal: bool = True,
       homo_head: bool = False, num_dense_heads: int = 0, head_sliding_step: int | None = None,
       head_sliding_offset: int = 0, vert_position_type: str | None = None) -> S2:
    """The S2-Attention pattern for ``heads`` query heads (``kv_heads`` for GQA: per kv head).

    Defaults are Phi-3-small's (block 64, 16 local blocks, vertical stride 8). ``local_blocks`` is
    the band in blocks including the current one: an int (causal: ``left``; noncausal: both sides)
    or ``(left, right)``. ``vert_position_type``: ``"absolute"`` / ``"relative"``, default absolute
    when causal and relative otherwise."""
    kv_heads = heads if kv_heads is None else kv_heads
    left, right = _sides(local_blocks, causal)
    mode = vert_position_type or ("absolute" if causal else "relative")
    _check(heads, kv_heads, sparse_block_size, left, right, vert_stride, homo_head, num_dense_heads,
           head_sliding_step, mode)
    step = head_sliding_step if head_sliding_step is not None else max(1, int(vert_stride / heads))
    return S2(heads=heads, kv_heads=kv_heads, block=sparse_block_size, left=left, right=right,
              stride=vert_stride, causal=causal, relative=mode == "relative", homo_head=homo_head,
              num_dense_heads=num_dense_heads, step=step, offset=head_sliding_offset)


def _sides(local_blocks, causal: bool) -> tuple[int, int]:
    if isinstance(local_blocks, (tuple, list)):
        if len(local_blocks) != 2:
            raise OptionError(f"s2: local_blocks={local_blocks!r} must be an int or a (left, right) pair.")
        return int(local_blocks[0]), int(local_blocks[1])
    return int(local_blocks), (1 if causal else int(local_blocks))


def _check(heads, kv_heads, block, left, right, stride, homo_head, num_dense_heads, step, mode):
    def bad(name, value, allowed):
        raise OptionError(f"s2: {name}={value!r} is invalid; {allowed}.")

    if kv_heads < 1 or heads % kv_heads:
        bad("kv_heads", kv_heads, f"it must divide heads={heads}")
    if block < 1:
        bad("sparse_block_size", block, "it must be >= 1 (the official kernel wants a power of 2 >= 16)")
    if left < 1 or right < 1:
        bad("local_blocks", (left, right), "every side must be >= 1 block (it includes the current "
            "block; the official LocalStrideSparseAttention requires local_blocks >= 1)")
    if stride < 1:
        bad("vert_stride", stride, "it must be >= 1 (1 is dense)")
    if not 0 <= num_dense_heads <= kv_heads:
        bad("num_dense_heads", num_dense_heads, f"it must be in [0, kv_heads={kv_heads}]")
    if homo_head and num_dense_heads:
        bad("num_dense_heads", num_dense_heads, "it must be 0 with homo_head=True (every head shares "
            "head 0's pattern); pass homo_head=False to mix dense and sparse heads")
    if step is not None and step < 1:
        bad("head_sliding_step", step, "it must be >= 1 (or None for max(1, int(vert_stride / heads)))")
    if mode not in VERT_POSITIONS:
        bad("vert_position_type", mode, f"use one of {VERT_POSITIONS} (or None for the default)")
