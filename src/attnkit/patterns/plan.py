"""Block plans: which (query-block, key-block) tiles of a pattern are empty, partial or full.

A plan is a small int8 tensor of tile states ``(Bp, Hp, nQ, nK)`` with ``Bp in {1, B}`` and
``Hp in {1, H}`` (0 = empty, 1 = partial, 2 = full), the same information FlexAttention's
``BlockMask`` holds. Intersections take the minimum of two plans' states and unions the maximum,
so composed patterns get their plans without touching single tokens. Plans of structured patterns
are computed analytically, at ``nQ x nK`` cost, never ``Lq x Lk``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

EMPTY, PARTIAL, FULL = 0, 1, 2


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class BlockPlan:
    """Tile states of one pattern at one size (see module doc)."""

    states: torch.Tensor  # int8 (Bp, Hp, nQ, nK)
    q_len: int
    k_len: int
    block_q: int
    block_k: int

    @property
    def num_q_blocks(self) -> int:
        return self.states.shape[-2]

    @property
    def num_k_blocks(self) -> int:
        return self.states.shape[-1]

    def tile_density(self) -> float:
        """Fraction of tiles computed (partial or full): the work a tile engine does."""
        return float((self.states > EMPTY).float().mean())

    def counts(self) -> dict[str, int]:
        s = self.states
        return {"empty": int((s == EMPTY).sum()), "partial": int((s == PARTIAL).sum()),
                "full": int((s == FULL).sum())}

    def __and__(self, other: BlockPlan) -> BlockPlan:
        return self._combine(other, torch.minimum)

    def __or__(self, other: BlockPlan) -> BlockPlan:
        return self._combine(other, torch.maximum)

    def _combine(self, other: BlockPlan, op) -> BlockPlan:
        same = (self.q_len, self.k_len, self.block_q, self.block_k) == (
            other.q_len, other.k_len, other.block_q, other.block_k)
        if not same:
            raise ValueError("cannot combine block plans of different sizes or block shapes")
        return BlockPlan(op(self.states, other.states), self.q_len, self.k_len, self.block_q, self.block_k)

    def kv_lists(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per query block, the non-empty key blocks in ascending order, FlexAttention style.

        Returns ``count (Bp, Hp, nQ)``, ``index (Bp, Hp, nQ, maxK)`` (padded with 0) and
        ``full (Bp, Hp, nQ, maxK)`` (False in the padding)."""
        present = self.states > EMPTY
        count = present.sum(-1)
        max_k = max(int(count.max()), 1) if count.numel() else 1
        # stable sort puts present tiles first, in ascending key-block order
        order = torch.argsort((~present).to(torch.int8), dim=-1, stable=True)[..., :max_k]
        slot = torch.arange(max_k, device=count.device)
        valid = slot < count[..., None]
        index = torch.where(valid, order, torch.zeros_like(order))
        full = torch.gather(self.states, -1, index) == FULL
        return count.to(torch.int32), index.to(torch.int32), full & valid

    def expand_tiles(self) -> torch.Tensor:
        """Tile states repeated to token resolution ``(Bp, Hp, Lq, Lk)`` (small sizes only)."""
        s = self.states.repeat_interleave(self.block_q, -2).repeat_interleave(self.block_k, -1)
        return s[..., : self.q_len, : self.k_len]


def plan_from_dense(mask: torch.Tensor, block_q: int, block_k: int) -> BlockPlan:
    """The plan of a dense bool mask ``(..., Lq, Lk)`` (tests and the generic fallback)."""
    while mask.dim() < 4:
        mask = mask.unsqueeze(0)
    Bp, Hp, Lq, Lk = mask.shape
    nq, nk = cdiv(Lq, block_q), cdiv(Lk, block_k)
    pad = torch.zeros(Bp, Hp, nq * block_q, nk * block_k, dtype=torch.int8, device=mask.device)
    valid = torch.zeros_like(pad, dtype=torch.bool)
    pad[..., :Lq, :Lk] = mask.to(torch.int8)
    valid[..., :Lq, :Lk] = True
    tiles = pad.view(Bp, Hp, nq, block_q, nk, block_k)
    vt = valid.view(Bp, Hp, nq, block_q, nk, block_k)
    any_ = tiles.amax(dim=(3, 5)) > 0
    # full: every in-range element visible (padding does not count against fullness)
    all_ = ((tiles > 0) | ~vt).all(dim=5).all(dim=3)
    states = torch.where(any_, torch.where(all_, FULL, PARTIAL), EMPTY).to(torch.int8)
    return BlockPlan(states, Lq, Lk, block_q, block_k)


def interval_plan(lo_first, hi_last, lo_last, hi_first, k_len: int, block_k: int) -> torch.Tensor:
    """Tile states for a rule of the form ``lo(q) <= k <= hi(q)`` with ``lo`` and ``hi``
    nondecreasing in q and the union of consecutive rows contiguous.

    Inputs are per query block (shape ``(..., nQ)``): ``lo``/``hi`` at the block's first and last
    real row. A tile is present iff its keys meet ``[lo_first, hi_last]`` and full iff they lie
    inside ``[lo_last, hi_first]``. Returns int8 states ``(..., nQ, nK)``.
    """
    nk = cdiv(k_len, block_k)
    ks = torch.arange(nk, device=lo_first.device) * block_k
    ke = torch.clamp(ks + block_k, max=k_len) - 1
    lf, hl = lo_first[..., None], hi_last[..., None]
    ll, hf = lo_last[..., None], hi_first[..., None]
    present = (torch.maximum(ks, lf) <= torch.minimum(ke, hl))
    full = (ks >= ll) & (ke <= hf)
    return torch.where(present, torch.where(full, FULL, PARTIAL), EMPTY).to(torch.int8)
