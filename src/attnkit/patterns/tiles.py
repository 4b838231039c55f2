"""Tile arithmetic shared by the analytic block plans of the 1D patterns.

Query tiles are described by the bottom-right aligned (absolute) positions of their first and last
real rows, key tiles by their first and last real columns; all helpers work on broadcastable
tensors, so a plan costs ``nQ x nK`` (times heads / batch) operations, never ``Lq x Lk``.

An interval rule ``lo(qa) <= k <= hi(qa)`` with ``lo``/``hi`` nondecreasing in ``qa`` is summarised
per query tile by ``Span(lo_first, hi_last, lo_last, hi_first)``: a tile is present iff its keys meet
``[lo_first, hi_last]`` and every key is visible to every row iff the keys lie in
``[lo_last, hi_first]`` (the keys every row of the tile sees).

``refine`` is the exact fallback for tiles an analysis leaves undecided: it evaluates the rule on
those tiles only (``#tiles x block_q x block_k`` work).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .base import _to_device
from .plan import EMPTY, FULL, PARTIAL, cdiv

# elements of one batch of refined tiles
_REFINE_ELEMENTS = 1 << 22


class Span(NamedTuple):
    """Per query tile: bounds at the first / last row (see module doc)."""

    lo_first: torch.Tensor
    hi_last: torch.Tensor
    lo_last: torch.Tensor
    hi_first: torch.Tensor


def query_tiles(q_len: int, k_len: int, block_q: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Absolute positions ``(first, last)`` of each query tile's first and last real row, ``(nQ,)``.
    Query row ``q`` sits at key position ``q + k_len - q_len`` (bottom-right alignment)."""
    first = torch.arange(cdiv(q_len, block_q), device=device) * block_q
    last = torch.clamp(first + block_q, max=q_len) - 1
    return first + (k_len - q_len), last + (k_len - q_len)


def key_tiles(k_len: int, block_k: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """First and last real key of each key tile, ``(nK,)``."""
    start = torch.arange(cdiv(k_len, block_k), device=device) * block_k
    return start, torch.clamp(start + block_k, max=k_len) - 1


def span(bounds, first: torch.Tensor, last: torch.Tensor) -> Span:
    """The Span of an interval rule given as ``bounds(qa) -> (lo, hi)``."""
    lo_f, hi_f = bounds(first)
    lo_l, hi_l = bounds(last)
    return Span(lo_f, hi_l, lo_l, hi_f)


def span_present(s: Span, ks: torch.Tensor, ke: torch.Tensor) -> torch.Tensor:
    return torch.maximum(ks, s.lo_first) <= torch.minimum(ke, s.hi_last)


def span_covers(s: Span, ks: torch.Tensor, ke: torch.Tensor) -> torch.Tensor:
    return (ks >= s.lo_last) & (ke <= s.hi_first)


def union_covers(a: Span, b: Span, ks: torch.Tensor, ke: torch.Tensor) -> torch.Tensor:
    """Whether the keys every row sees through ``a`` or through ``b`` cover ``[ks, ke]``.

    This decides fullness exactly when, for each key, the rows that see it through one interval
    include those that see it through the other (true for a sink / prefix interval, which reaches
    every row that can see the key at all)."""

    def chain(x: Span, y: Span) -> torch.Tensor:  # x holds ks, y continues it up to ke
        return (x.lo_last <= ks) & (y.lo_last <= x.hi_first + 1) & (y.hi_first >= ke)

    return span_covers(a, ks, ke) | span_covers(b, ks, ke) | chain(a, b) | chain(b, a)


def states(present: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """int8 tile states from bool ``present`` / ``full`` (full implies present)."""
    return torch.where(present, torch.where(full, FULL, PARTIAL), EMPTY).to(torch.int8)


def floor_mod(x: torch.Tensor, m) -> torch.Tensor:
    """``x mod m`` in ``[0, m)`` (integer tensors)."""
    return torch.remainder(x, m)


def refine(pattern, tiles: torch.Tensor, q_len: int, k_len: int, block_q: int, block_k: int,
           device=None) -> torch.Tensor:
    """Tile states ``(Bp, Hp, nQ, nK)`` where every PARTIAL entry of ``tiles`` (a conservative plan:
    no visible tile marked EMPTY) is replaced by its exact state, found by evaluating the pattern's
    rule on that tile only."""
    tiles = tiles.clone()
    todo = (tiles == PARTIAL).nonzero()
    if todo.numel() == 0:
        return tiles
    p = _to_device(pattern.params(q_len, k_len), device)
    rows = torch.arange(block_q, device=device)
    cols = torch.arange(block_k, device=device)
    per_batch = max(1, _REFINE_ELEMENTS // (block_q * block_k))
    for start in range(0, todo.shape[0], per_batch):
        idx = todo[start:start + per_batch].to(device)
        b, h, i, j = (idx[:, n].view(-1, 1, 1) for n in range(4))
        q = i * block_q + rows.view(1, -1, 1)
        k = j * block_k + cols.view(1, 1, -1)
        valid = (q < q_len) & (k < k_len)
        seen = pattern.rule(b, h, q.clamp(max=q_len - 1), k.clamp(max=k_len - 1), p)
        seen = seen.expand(valid.shape[0], block_q, block_k)
        present = (seen & valid).flatten(1).any(1)
        full = (seen | ~valid).flatten(1).all(1)
        tiles[tuple(idx.T)] = states(present, full).to(tiles.device)
    return tiles

