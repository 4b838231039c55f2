"""Token orders: a permutation of a self-attention call's tokens under which a pattern's tiles are
denser (fewer tiles to compute, more of them full).

A pattern offers one through ``Pattern.token_order(q_len, k_len, block)``; an engine then gathers
``q``, ``k``, ``v`` into the order, runs ``TokenOrder.pattern`` (the same mask seen in the new order)
and gathers the output back: the result is the unpermuted computation's, only the tiles differ.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

from .base import Pattern


@dataclass(frozen=True)
class TokenOrder:
    """``order (L,)`` int64: position ``r`` of the reordered sequence holds token ``order[r]``.
    ``pattern`` is the mask over reordered positions, ``pattern.rule(r, c) = original(order[r],
    order[c])``; :class:`~attnkit.patterns.PermutedPattern` ``(pattern, order, order)`` is the
    original again. ``description`` says which order it is (engines report it)."""

    order: torch.Tensor
    pattern: Pattern
    description: str

    @cached_property
    def inverse(self) -> torch.Tensor:
        """``inverse[order[r]] = r``: where each token went."""
        return torch.argsort(self.order)


__all__ = ["TokenOrder"]
