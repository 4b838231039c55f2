"""Block selections: the pattern of a dynamic-sparsity method once its selection is made.

A selection is a tile table ``(Bp, Hp, nQ, nK)`` (bool or int8 tile states) over query blocks of
``block_q`` rows and key blocks of ``block_k`` columns: key j is visible to query i iff the tile
``(i // block_q, j // block_k)`` is selected. Combine it with token-level rules the usual way
(``selection & ak.patterns.causal()``). Its block plan is the table itself (when the engines use
the same tile sizes), so a selection is executed without ever evaluating an ``Lq x Lk`` mask.
"""

from __future__ import annotations

import torch

from .base import Pattern
from .plan import EMPTY, FULL, cdiv


class BlockSelection(Pattern):
    """``tiles``: bool ``(Bp, Hp, nQ, nK)`` — True where the (query block, key block) is kept."""

    def __init__(self, tiles: torch.Tensor, block_q: int, block_k: int | None = None):
        while tiles.dim() < 4:
            tiles = tiles.unsqueeze(0)
        self.tiles = tiles.to(torch.bool)
        self.block_q, self.block_k = block_q, block_k or block_q
        self.batch = tiles.shape[0] if tiles.shape[0] > 1 else None
        self.heads = tiles.shape[1] if tiles.shape[1] > 1 else None

    def check(self, q_len, k_len):
        want = (cdiv(q_len, self.block_q), cdiv(k_len, self.block_k))
        if tuple(self.tiles.shape[-2:]) != want:
            from ..errors import ShapeError

            raise ShapeError(
                f"block selection has {tuple(self.tiles.shape[-2:])} tiles but Lq={q_len}, Lk={k_len} with "
                f"blocks ({self.block_q}, {self.block_k}) need {want}.")

    def params(self, q_len, k_len):
        return {"tiles": self.tiles, "bq": self.block_q, "bk": self.block_k}

    def rule(self, b, h, q, k, p):
        t = p["tiles"]
        return t[b.clamp(max=t.shape[0] - 1), h.clamp(max=t.shape[1] - 1), q // p["bq"], k // p["bk"]]

    def _plan(self, q_len, k_len, block_q, block_k, device):
        if (block_q, block_k) != (self.block_q, self.block_k):
            return None  # other tile sizes: evaluate the rule generically
        return torch.where(self.tiles.to(device) if device else self.tiles, FULL, EMPTY).to(torch.int8)

    def describe(self):
        density = float(self.tiles.float().mean())
        return f"block_selection({self.block_q}x{self.block_k}, {density:.0%} of tiles)"
