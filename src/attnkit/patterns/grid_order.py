"""Grid patterns in a tiled token order (NATTEN / GNA "token permute").

In row-major order a block of 128 tokens is part of a grid row, so a query block's neighborhood
touches many key blocks, nearly all of them partial. Reordering the tokens tile by tile makes
every block a compact box of the grid (``8 x 16`` in 2-D, ``2 x 8 x 8`` in 3-D): far fewer tiles to
compute, more of them full. Hassani et al., "Generalized Neighborhood Attention" (arXiv
2504.16922) run their kernels on tokens permuted this way. Read in SHI-Labs/NATTEN
``src/natten/token_permute/torch_impl.py`` (``_maybe_pad``, ``_token_permute``): NATTEN pads the
layout up to a multiple of ``tile * dilation`` per dimension, views it as ``(rest, tile, dilation)``
per dimension and moves the dilation groups to the batch and the tiles in front of the cells of
each tile. attnkit does not pad (the tail below) and keeps dilation groups interleaved inside a
tile (with dilation > 1 a tile's queries see about ``1 / dilation`` of each key tile per
dimension, so fewer tiles are full than under NATTEN's group split).

**The order.** For a tile ``t = (t_0, ..., t_{D-1})`` with ``prod(t) = block``, the *core*
``prod_d [0, (n_d // t_d) * t_d)`` is cut into whole tiles, visited in row-major order of the tile
grid, each tile's cells in row-major order; the remaining *tail* cells (any coordinate past the
last whole tile along some dimension) follow in row-major order. Core blocks are exactly tiles;
tail blocks are slabs of leftover rows / columns.

**The tile.** Among the factorizations of ``block`` that fit the grid, a heuristic estimates the
key blocks each query tile meets (per dimension, from the window reach of an aligned query tile,
averaged over tile positions; divided by the core's share of the tokens); the three best are then
planned exactly and the order is used only if its plan computes fewer tiles than row-major order
(or as many, with more full ones). ``block`` may be ``(block_q, block_k)`` with ``block_k``
dividing ``block_q``: key blocks are then the first / second ... part of a tile.

**The plan, analytically.** Every block of the order has a coordinate bounding box, equal to its
cells for core blocks. The box-pair tests of :class:`~attnkit.patterns.grid.GridPattern` on the
bounding boxes give exact states where both boxes are exact; where one is not (tail blocks), an
empty verdict is still exact and a full one sound, and tiles left partial are refined by evaluating
the rule on them (:func:`attnkit.patterns.tiles.refine`). Cost ``nQ x nK x terms x D`` plus the
refined tail tiles, never ``L x L``.
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from math import prod

import torch

from .base import Pattern
from .grid import GridPattern, grid_coords, table_rule
from .order import TokenOrder
from .plan import EMPTY, FULL, PARTIAL, cdiv
from .tiles import refine

# (query block, key block) pairs per op of the tiled plan
PAIRS_PER_OP = 1 << 16
# tile shapes planned exactly after the heuristic ranking
EXACT_CANDIDATES = 3
_ORDERS: OrderedDict = OrderedDict()
_TABLES: OrderedDict = OrderedDict()
CACHE = 16


def factorizations(n: int, parts: int) -> list[tuple[int, ...]]:
    """Every ordered tuple of ``parts`` positive ints whose product is ``n``."""
    if parts == 1:
        return [(n,)]
    return [(d, *rest) for d in range(1, n + 1) if n % d == 0 for rest in factorizations(n // d, parts - 1)]


@functools.lru_cache(maxsize=32)
def tiled_order(grid: tuple[int, ...], tile: tuple[int, ...]) -> torch.Tensor:
    """The tiled order of ``grid`` (module doc): ``order[r]`` is the row-major index of the token
    at position ``r``. Cached; do not modify."""
    D = len(grid)
    whole = [n // t for n, t in zip(grid, tile)]
    pitch = [prod(grid[d + 1:]) for d in range(D)]
    idx = torch.zeros(*whole, *tile, dtype=torch.long)
    for d in range(D):
        shape_j = [1] * (2 * D)
        shape_j[d] = whole[d]
        shape_o = [1] * (2 * D)
        shape_o[D + d] = tile[d]
        x = torch.arange(whole[d]).view(shape_j) * tile[d] + torch.arange(tile[d]).view(shape_o)
        idx = idx + x * pitch[d]
    coords = grid_coords(grid)
    in_core = torch.ones(prod(grid), dtype=torch.bool)
    for d in range(D):
        in_core &= coords[d] < whole[d] * tile[d]
    return torch.cat([idx.flatten(), torch.arange(prod(grid))[~in_core]])


def key_tile(tile: tuple[int, ...], block_k: int) -> tuple[int, ...] | None:
    """The box formed by the first ``block_k`` cells of a tile (row-major inside the tile), or
    None when they do not form one."""
    rest, out = block_k, []
    for t in reversed(tile):
        if rest >= t:
            if rest % t:
                return None
            out.append(t)
            rest //= t
        else:
            if t % rest:
                return None
            out.append(rest)
            rest = 1
    return tuple(reversed(out)) if rest == 1 else None


def expected_key_blocks(pattern: GridPattern, p: dict, tile: tuple[int, ...], ktile: tuple[int, ...]) -> float:
    """Estimated key blocks a core query tile meets (module doc): per dimension, the key tiles
    its window reach spans, averaged over the tile's positions; a product per term, summed."""
    total = 0.0
    for t in range(pattern.terms):
        term = 1.0
        for d, n in enumerate(pattern.grid):
            core = (n // tile[d]) * tile[d]
            a = torch.arange(n // tile[d]) * tile[d]
            lo, hi = pattern._axis_reach(t, d, a, a + tile[d] - 1, p)
            lo, hi = torch.clamp(lo, min=0), torch.clamp(hi, max=core - 1)
            span = torch.where(hi >= lo, hi // ktile[d] - lo // ktile[d] + 1, 0)
            term *= float(span.float().mean())
        total += term
    return total


def block_bounds(coords: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per block of ``block`` consecutive positions of ``coords (D, L)``: the bounding box
    ``lo, hi (nB, D)`` and whether the block fills it exactly ``(nB,)``."""
    D, L = coords.shape
    nb = cdiv(L, block)
    pad = nb * block - L
    big = torch.iinfo(torch.long).max // 4
    lo = torch.nn.functional.pad(coords, (0, pad), value=big).view(D, nb, block).amin(-1).T
    hi = torch.nn.functional.pad(coords, (0, pad), value=-1).view(D, nb, block).amax(-1).T
    count = torch.clamp(L - torch.arange(nb, device=coords.device) * block, max=block)
    return lo, hi, (hi - lo + 1).prod(-1) == count


class TiledGrid(Pattern):
    """``base`` (a grid pattern) over tokens in the tiled order of ``tile`` (module doc): position
    ``r`` is token ``tiled_order(grid, tile)[r]``."""

    def __init__(self, base: GridPattern, tile: tuple[int, ...]):
        self.base, self.tile = base, tuple(tile)
        self._plans: dict = {}

    @property
    def order(self) -> torch.Tensor:
        return tiled_order(self.base.grid, self.tile)

    def check(self, q_len, k_len):
        self.base.check(q_len, k_len)

    def params(self, q_len, k_len):
        key = (self.base.config_key(), self.tile)
        hit = _TABLES.get(key) if key[0] is not None else None
        if hit is None:
            tables = self.base.params(q_len, k_len)["tables"]
            order = self.order
            hit = {"tables": {"codes": tables["codes"][:, order].contiguous(), "layout": tables["layout"]}}
            if key[0] is not None:
                _remember(_TABLES, key, hit)
        return dict(hit)

    def rule(self, b, h, q, k, p):
        return table_rule(q, k, p["tables"])

    def _plan(self, q_len, k_len, block_q, block_k, device):
        key = (q_len, k_len, block_q, block_k, str(device))
        if key not in self._plans:
            self._plans[key] = self._tiled_plan(q_len, k_len, block_q, block_k, device)
        return self._plans[key]

    def _tiled_plan(self, q_len, k_len, block_q, block_k, device):
        base = self.base
        p = base.settings(q_len, k_len)
        coords = grid_coords(base.grid)[:, self.order].to(device)
        qlo, qhi, qexact = block_bounds(coords, block_q)
        klo, khi, kexact = block_bounds(coords, block_k)
        nq, nk = qlo.shape[0], klo.shape[0]
        states = torch.empty(nq, nk, dtype=torch.int8, device=device)
        step = max(1, PAIRS_PER_OP // nk)
        for r0 in range(0, nq, step):
            rows = slice(r0, r0 + step)
            seen = full = None
            for t in range(base.terms):
                seen_t = full_t = None
                for d in range(base.rank):
                    s, f = base._axis_tests(t, d, qlo[rows, d, None], qhi[rows, d, None], klo[None, :, d],
                                            khi[None, :, d], p)
                    seen_t = s if seen_t is None else seen_t & s
                    full_t = f if full_t is None else full_t & f
                seen = seen_t if seen is None else seen | seen_t
                full = full_t if full is None else full | full_t
            states[rows] = torch.where(seen, torch.where(full, FULL, PARTIAL), EMPTY).to(torch.int8)
        todo = (states == PARTIAL) & ~(qexact[:, None] & kexact[None, :])
        if bool(todo.any()):
            loose = torch.where(todo, PARTIAL, EMPTY).to(torch.int8)[None, None]
            exact = refine(self, loose, q_len, k_len, block_q, block_k, device)[0, 0]
            states = torch.where(todo, exact, states)
        return states

    def describe(self):
        return f"{self.base.describe()} in {'x'.join(map(str, self.tile))} tiles"


def _remember(cache: OrderedDict, key, value) -> None:
    cache[key] = value
    if len(cache) > CACHE:
        cache.popitem(last=False)


def _computed(plan) -> tuple[int, int]:
    """(tiles computed, -full tiles): smaller is better."""
    s = plan.states
    return int((s > EMPTY).sum()), -int((s == FULL).sum())


def grid_token_order(pattern: GridPattern, q_len: int, k_len: int, block) -> TokenOrder | None:
    """The tiled order for ``pattern`` at this length and block (module doc), or None when no tile
    computes fewer tiles than row-major order. Cached per configuration."""
    block_q, block_k = (block, block) if isinstance(block, int) else block
    if pattern.rank < 2 or q_len != k_len or q_len != pattern.length or block_q % block_k:
        return None
    key = (pattern.config_key(), q_len, block_q, block_k)
    if key[0] is not None and key in _ORDERS:
        _ORDERS.move_to_end(key)
        return _ORDERS[key]
    found = _choose(pattern, q_len, block_q, block_k)
    if key[0] is not None:
        _remember(_ORDERS, key, found)
    return found


def _choose(pattern: GridPattern, length: int, block_q: int, block_k: int) -> TokenOrder | None:
    p = pattern.settings(length, length)
    ranked = []
    for tile in factorizations(block_q, pattern.rank):
        ktile = key_tile(tile, block_k)
        if ktile is None or any(t > n for t, n in zip(tile, pattern.grid)):
            continue
        core = prod((n // t) * t for n, t in zip(pattern.grid, tile)) / length
        ranked.append((expected_key_blocks(pattern, p, tile, ktile) / core, tile))
    ranked.sort()
    identity = torch.arange(length)
    best_cost = _computed(pattern.block_plan(length, length, (block_q, block_k)))
    row_major = best_cost
    best = None
    for _, tile in ranked[:EXACT_CANDIDATES]:
        if torch.equal(tiled_order(pattern.grid, tile), identity):
            continue
        tiled = TiledGrid(pattern, tile)
        cost = _computed(tiled.block_plan(length, length, (block_q, block_k)))
        if cost < best_cost:
            best, best_cost = tiled, cost
    if best is None:
        return None
    tail = length - prod((n // t) * t for n, t in zip(pattern.grid, best.tile))
    n_tiles = cdiv(length, block_q) * cdiv(length, block_k)
    text = (f"tokens reordered into {'x'.join(map(str, best.tile))} tiles of the grid "
            f"{pattern.grid} ({tail} tail tokens in row-major order): {best_cost[0]} of {n_tiles} "
            f"{block_q}x{block_k} tiles computed ({-best_cost[1]} full), against {row_major[0]} "
            f"({-row_major[1]} full) in row-major order")
    return TokenOrder(best.order, best, text)


__all__ = ["TiledGrid", "block_bounds", "factorizations", "grid_token_order", "key_tile", "tiled_order"]
