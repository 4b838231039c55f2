"""Patterns over tokens laid out on a grid (images, video): the shared machinery.

**Token order.** A sequence of ``L = n_0 * ... * n_{D-1}`` tokens is the grid's cells in row-major
order, last dimension fastest (``x.flatten()`` of an ``(n_0, ..., n_{D-1}, C)`` feature map, NATTEN's
``idx2crd``): token ``i`` has coordinates ``x_d = (i // pitch_d) % n_d`` with
``pitch_d = n_{d+1} * ... * n_{D-1}``. A video ``(T, H, W)`` is frame after frame, row after row.

**Rules.** A grid pattern is a union of ``terms`` product rules. Under term ``t``, key ``y`` is
visible to query ``x`` iff along every dimension ``d``

    x_d = y_d (mod dil_d)   and   lo <= y_d // dil_d <= hi,   (lo, hi) = axis_bounds(t, d, x_d // dil_d, n_g)

where ``dil_d`` is the dilation (1 unless the pattern has one) and ``n_g`` the size of the query's
dilation group, ``ceil((n_d - x_d % dil_d) / dil_d)``. Subclasses give ``axis_bounds``; ``lo`` and
``hi`` must be nondecreasing in the query coordinate, and the windows of consecutive queries must
overlap or touch, so the keys seen by an interval of queries form one interval.
``reference_rule`` evaluates this readably (coordinates from the index by ``//`` and ``%``).

**The rule as table lookups.** ``rule`` (what the engines and FlexAttention's ``mask_mod`` run)
reads per-token int32 tables (one ``(rows, L)`` tensor) built once per configuration: along dimension ``d`` each key gets
the code ``c_d = (y_d % dil_d) * m_d + y_d // dil_d`` (``m_d = ceil(n_d / dil_d)``, so each dilation
group owns the codes ``[g m_d, g m_d + m_d)``), and each query, per term, the code interval
``[lo_d, hi_d]`` of its visible keys: its group's offset plus its window clamped to the group.
Then key ``y`` is visible to query ``x`` iff along every dimension ``lo_d[x] <= c_d[y] <= hi_d[x]``
(OR over terms): three gathers and two int32 compares per dimension, no division. The tables are
``O(L)`` and cached per configuration (``params`` returns the same tensors for equal
configurations, so engines' caches keyed by tensor identity hit).

**Block plans, analytically.** A block of consecutive token indices is a union of at most
``2^D - 1`` axis-aligned boxes (a partial row, whole rows, a partial row; recursively per
dimension). On a pair (query box X, key box Y) a product rule is

- non-empty iff along every dimension some ``(x_d, y_d)`` of the box is visible: with the windows'
  union an interval, ``max(lo(a), c) <= min(hi(b), e)`` for ``X_d = [a, b]``, ``Y_d = [c, e]``;
- full iff along every dimension every ``(x_d, y_d)`` is visible: ``c >= lo(b)`` and
  ``e <= hi(a)`` (with dilation > 1 only a single query against a single key of its group).

With dilation the non-empty test runs once per residue class. A tile is non-empty iff some box
pair is, and full iff every box pair is, so the plan is exact for one product rule. Only the key
blocks inside each query block's band are tested (the index range of the box spanned by the
windows of the block's coordinate bounding box); the others are empty. Cost at most
``nQ x nK x (box pairs) x D``, never ``Lq x Lk``. For a union of terms a box pair is non-empty iff
some term is (exact) and counted full iff some term is full on it: exact for the unions built here
(``DividedSpaceTime`` proves it), conservative (partial instead of full) in general.

**Tiled token order.** ``token_order`` offers an order in which every run of ``block`` tokens is a
compact box of the grid (NATTEN/GNA's token permute): see :mod:`attnkit.patterns.grid_order`.
"""

from __future__ import annotations

from collections import OrderedDict
from math import prod
from typing import Any

import torch

from ..errors import OptionError, ShapeError
from .base import Pattern
from .plan import EMPTY, FULL, PARTIAL, cdiv

# elements of one tensor in the analytic plans: below torch's parallel grain size (32768), so
# the many small ops run on one thread (waking a second one costs ~8 ms per op on a loaded CPU)
SMALL_OP = 1 << 14
# configurations whose parameters (settings and per-token tables) are kept
PARAMS_CACHE = 16
_PARAMS: OrderedDict = OrderedDict()


def check_grid(grid: Any, what: str = "grid", owner: str = "") -> tuple[int, ...]:
    """A grid of 1 to 3 positive ints (an int is a 1-D grid); ``owner`` prefixes errors."""
    dims = (grid,) if isinstance(grid, int) and not isinstance(grid, bool) else grid
    ok = isinstance(dims, (tuple, list)) and 1 <= len(dims) <= 3 and all(
        isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in dims)
    if not ok:
        raise OptionError(
            f"{_who(owner)}{what}={grid!r} is invalid; it must be 1 to 3 positive ints, the token layout "
            "(e.g. (H, W) for an image, (T, H, W) for a video), row-major with the last dimension fastest.")
    return tuple(int(n) for n in dims)


def per_dim(value: Any, rank: int, name: str, low: int = 1, owner: str = "") -> tuple[int, ...]:
    """An int (the same along every dimension) or one int per grid dimension, each >= low."""
    vals = (value,) * rank if isinstance(value, int) and not isinstance(value, bool) else value
    ok = isinstance(vals, (tuple, list)) and len(vals) == rank and all(
        isinstance(v, int) and not isinstance(v, bool) and v >= low for v in vals)
    if not ok:
        raise OptionError(
            f"{_who(owner)}{name}={value!r} is invalid; it must be an int >= {low} or a tuple of {rank} ints >= {low} "
            f"(one per grid dimension).")
    return tuple(int(v) for v in vals)


def per_dim_flags(value: Any, rank: int, name: str, owner: str = "") -> tuple[bool, ...]:
    """A bool (the same along every dimension) or one bool per grid dimension."""
    vals = (value,) * rank if isinstance(value, bool) else value
    if not (isinstance(vals, (tuple, list)) and len(vals) == rank and all(isinstance(v, bool) for v in vals)):
        raise OptionError(
            f"{_who(owner)}{name}={value!r} is invalid; it must be True/False or a tuple of {rank} bools "
            f"(one per grid dimension), e.g. {(True,) + (False,) * (rank - 1)}.")
    return tuple(vals)


def _who(owner: str) -> str:
    return f"{owner}: " if owner else ""


def _fmt(dims: tuple) -> str:
    return str(dims[0]) if len(set(dims)) == 1 else "(" + ", ".join(str(v) for v in dims) + ")"


class GridPattern(Pattern):
    """Base of self-attention patterns over a row-major grid (see the module doc).

    Subclasses set ``terms`` and implement ``axis_bounds(term, d, u, n, p) -> (lo, hi)``
    (broadcastable integer tensors; every number read from ``p``) and extend ``settings`` (the
    numbers ``axis_bounds`` reads); ``params`` adds the per-token tables of ``rule``.
    """

    terms = 1
    name = "grid pattern"

    def __init__(self, grid):
        self.grid = check_grid(grid, owner=self.name)

    @property
    def rank(self) -> int:
        return len(self.grid)

    @property
    def length(self) -> int:
        return prod(self.grid)

    def axis_bounds(self, term: int, d: int, u, n, p):
        raise NotImplementedError

    def settings(self, q_len, k_len) -> dict[str, Any]:
        """The numbers of the window arithmetic (``reference_rule``, ``axis_bounds``, plans)."""
        pitch = [prod(self.grid[d + 1:]) for d in range(self.rank)]
        return {"shape": torch.tensor(self.grid), "pitch": torch.tensor(pitch),
                "dilation": torch.ones(self.rank, dtype=torch.long)}

    def params(self, q_len, k_len):
        """``settings`` plus ``tables`` (see the module doc); the same tensors for equal configurations."""
        key = self.config_key()
        hit = _PARAMS.get(key) if key is not None else None
        if hit is None:
            p = self.settings(q_len, k_len)
            hit = {**p, "tables": grid_tables(self, p)}
            if key is not None:
                _PARAMS[key] = hit
                if len(_PARAMS) > PARAMS_CACHE:
                    _PARAMS.popitem(last=False)
        else:
            _PARAMS.move_to_end(key)
        return dict(hit)

    def config_key(self) -> tuple | None:
        """What defines this pattern: its class and attributes (None if they are not hashable)."""
        items = tuple(sorted(vars(self).items()))
        try:
            hash(items)
        except TypeError:
            return None
        return (type(self), items)

    def check(self, q_len, k_len):
        if q_len != k_len:
            raise ShapeError(
                f"{self.describe()} is self-attention over a grid: it needs Lq == Lk, got Lq={q_len}, "
                f"Lk={k_len}.")
        if q_len != self.length:
            raise ShapeError(
                f"{self.describe()}: the grid {self.grid} has {self.length} tokens but the sequence has "
                f"{q_len}; tokens are the grid's cells in row-major order, so prod(grid) must equal L.")

    # -- rule ------------------------------------------------------------------------------
    def rule(self, b, h, q, k, p):
        return table_rule(q, k, p["tables"])

    def token_order(self, q_len, k_len, block=128):
        from .grid_order import grid_token_order

        return grid_token_order(self, q_len, k_len, block)

    def coords(self, idx, p) -> list:
        """Row-major coordinates of token indices (one tensor per dimension)."""
        return [(idx // p["pitch"][d]) % p["shape"][d] for d in range(p["shape"].shape[0])]

    def reference_rule(self, b, h, q, k, p):
        """The rule from the module doc, readably (``rule`` computes the same from tables)."""
        xq, xk = self.coords(q, p), self.coords(k, p)
        out = None
        for t in range(self.terms):
            m = None
            for d in range(len(xq)):  # the grid's rank, from p (a shape, not a value)
                md = self._axis_rule(t, d, xq[d], xk[d], p)
                m = md if m is None else m & md
            out = m if out is None else out | m
        return out

    def _axis_rule(self, t, d, x, y, p):
        dil = p["dilation"][d]
        g = x % dil
        n_g = (p["shape"][d] - g + dil - 1) // dil
        lo, hi = self.axis_bounds(t, d, x // dil, n_g, p)
        v = y // dil
        return (y % dil == g) & (v >= lo) & (v <= hi)

    # -- analytic plan ----------------------------------------------------------------------
    def _plan(self, q_len, k_len, block_q, block_k, device):
        p = self.settings(q_len, k_len)
        qlo, qhi, qok = block_boxes(q_len, block_q, self.grid)
        klo, khi, kok = block_boxes(k_len, block_k, self.grid)
        nq, sq = qok.shape
        nk, sk = kok.shape
        first, count = self._key_band(qlo, qhi, qok, block_k, p)
        width = max(1, int(count.max()))
        step = max(1, SMALL_OP // (sq * width * sk))
        states = torch.zeros(nq, nk + 1, dtype=torch.int8)  # the last column takes out-of-band writes
        slot = torch.arange(width)
        for c0 in range(0, nq, step):
            rows = slice(c0, c0 + step)
            inband = slot < count[rows, None]
            target = torch.where(inband, first[rows, None] + slot, nk)  # (C, W) key blocks in the band
            kidx = torch.clamp(target, max=nk - 1)
            qa = [qlo[rows, :, d][:, :, None, None] for d in range(self.rank)]
            qb = [qhi[rows, :, d][:, :, None, None] for d in range(self.rank)]
            kc = [klo[kidx][..., d][:, None] for d in range(self.rank)]  # (C, 1, W, Sk)
            ke = [khi[kidx][..., d][:, None] for d in range(self.rank)]
            seen = full = None
            for t in range(self.terms):
                seen_t = full_t = None
                for d in range(self.rank):
                    s, f = self._axis_tests(t, d, qa[d], qb[d], kc[d], ke[d], p)
                    seen_t = s if seen_t is None else seen_t & s
                    full_t = f if full_t is None else full_t & f
                seen = seen_t if seen is None else seen | seen_t
                full = full_t if full is None else full | full_t
            pair = qok[rows][:, :, None, None] & kok[kidx][:, None] & inband[:, None, :, None]
            nonempty = (seen & pair).any(3).any(1)
            allfull = (full | ~pair).all(3).all(1)
            tile = torch.where(nonempty, torch.where(allfull, FULL, PARTIAL), EMPTY).to(torch.int8)
            states[rows].scatter_(1, target, tile)
        return states[:, :nk].contiguous().to(device)

    def _key_band(self, qlo, qhi, qok, block_k, p):
        """Per query block, the first key block and the number of key blocks that can hold a
        visible key (a superset: from the bounding box of the block's query coordinates)."""
        big = torch.iinfo(torch.long).max // 4
        a = torch.where(qok[..., None], qlo, big).amin(1)  # (nQ, D) bounding box of the block
        b = torch.where(qok[..., None], qhi, -1).amax(1)
        kmin = kmax = None
        for t in range(self.terms):
            lo_idx = hi_idx = 0
            empty = torch.zeros(a.shape[0], dtype=torch.bool)
            for d in range(self.rank):
                n = self.grid[d]
                lo, hi = self._axis_reach(t, d, a[:, d], b[:, d], p)
                lo, hi = torch.clamp(lo, min=0), torch.clamp(hi, max=n - 1)
                empty |= lo > hi
                lo_idx = lo_idx + lo * p["pitch"][d]
                hi_idx = hi_idx + hi * p["pitch"][d]
            lo_idx = torch.where(empty, big, lo_idx)
            hi_idx = torch.where(empty, -1, hi_idx)
            kmin = lo_idx if kmin is None else torch.minimum(kmin, lo_idx)
            kmax = hi_idx if kmax is None else torch.maximum(kmax, hi_idx)
        first = torch.where(kmax >= kmin, kmin // block_k, 0)
        count = torch.where(kmax >= kmin, kmax // block_k - kmin // block_k + 1, 0)
        return first, count

    def _axis_reach(self, t, d, a, b, p):
        """Key coordinates (a superset of those) visible to queries with coordinates in [a, b]."""
        dil, n = int(p["dilation"][d]), int(p["shape"][d])
        if dil == 1:
            nt = torch.tensor(n)
            return self.axis_bounds(t, d, a, nt, p)[0], self.axis_bounds(t, d, b, nt, p)[1]
        big = torch.iinfo(torch.long).max // 4
        lo_all = torch.full_like(a, big)
        hi_all = torch.full_like(a, -big)
        for g in range(min(dil, n)):
            n_g = torch.tensor((n - g + dil - 1) // dil)
            ua, ub = -((g - a) // dil), (b - g) // dil
            lo = g + dil * self.axis_bounds(t, d, ua, n_g, p)[0]
            hi = g + dil * self.axis_bounds(t, d, ub, n_g, p)[1]
            lo_all = torch.where(ua <= ub, torch.minimum(lo_all, lo), lo_all)
            hi_all = torch.where(ua <= ub, torch.maximum(hi_all, hi), hi_all)
        return lo_all, hi_all

    def _axis_tests(self, t, d, a, b, c, e, p):
        """Along dimension d, for queries ``x in [a, b]`` and keys ``y in [c, e]``: (is some pair
        visible, is every pair visible). Tensors broadcast; intervals may be invalid (masked later)."""
        dil, n = int(p["dilation"][d]), int(p["shape"][d])
        if dil == 1:
            nt = torch.tensor(n)
            lo_a, hi_a = self.axis_bounds(t, d, a, nt, p)
            lo_b, hi_b = self.axis_bounds(t, d, b, nt, p)
            seen = torch.maximum(lo_a, c) <= torch.minimum(hi_b, e)
            full = (c >= lo_b) & (e <= hi_a)
            return seen, full
        seen = torch.zeros((), dtype=torch.bool)
        for g in range(min(dil, n)):
            n_g = torch.tensor((n - g + dil - 1) // dil)
            ua, ub = -((g - a) // dil), (b - g) // dil  # queries of group g: u in [ua, ub]
            vc, ve = -((g - c) // dil), (e - g) // dil  # keys of group g: v in [vc, ve]
            lo, _ = self.axis_bounds(t, d, ua, n_g, p)
            _, hi = self.axis_bounds(t, d, ub, n_g, p)
            seen = seen | ((ua <= ub) & (vc <= ve) & (torch.maximum(lo, vc) <= torch.minimum(hi, ve)))
        g = a % dil
        lo, hi = self.axis_bounds(t, d, a // dil, (n - g + dil - 1) // dil, p)
        v = c // dil
        full = (a == b) & (c == e) & (c % dil == g) & (v >= lo) & (v <= hi)
        return seen, full

    def _grid_text(self) -> str:
        return "grid=" + ("(" + ", ".join(map(str, self.grid)) + ")")


def table_rule(q, k, tables: dict) -> torch.Tensor:
    """Visibility from the per-token tables (module doc): ``tables["codes"]`` is int32
    ``(D + 2 T D, L)``: row ``d`` the key codes along dimension ``d``, rows ``D + 2 (t D + d)`` and
    the next the query intervals' low and high ends of term ``t``; ``tables["layout"]`` is the
    string ``"TxD"``, a constant of a compiled kernel (so the number of terms and dimensions is
    structure, not a tensor size). OR over terms of the AND over dimensions of
    ``low[q] <= key[k] <= high[q]``. One stacked tensor, not one per row: FlexAttention's CPU
    template fails to compile several captured buffers of dynamic size (torch 2.13)."""
    codes = tables["codes"]
    terms, dims = (int(x) for x in tables["layout"].split("x"))
    out = None
    for t in range(terms):
        term = None
        for d in range(dims):
            code = codes[d][k]
            row = dims + 2 * (t * dims + d)
            seen = (code >= codes[row][q]) & (code <= codes[row + 1][q])
            term = seen if term is None else term & seen
        out = term if out is None else out | term
    return out


def grid_coords(grid: tuple[int, ...]) -> torch.Tensor:
    """Coordinates ``(D, L)`` of the tokens of a row-major grid."""
    idx = torch.arange(prod(grid))
    pitch = [prod(grid[d + 1:]) for d in range(len(grid))]
    return torch.stack([(idx // pitch[d]) % n for d, n in enumerate(grid)])


def grid_tables(pattern: GridPattern, p: dict[str, Any]) -> dict[str, Any]:
    """The per-token tables of ``pattern`` (see ``table_rule``) from its ``settings`` ``p``."""
    coords = grid_coords(pattern.grid)
    D, T = pattern.rank, pattern.terms
    rows: list = [None] * (D + 2 * T * D)
    for d, n in enumerate(pattern.grid):
        dil = int(p["dilation"][d])
        m = -(-n // dil)
        x = torch.arange(n)
        g, u = x % dil, x // dil
        n_g = (n - g + dil - 1) // dil
        rows[d] = (g * m + u)[coords[d]]
        for t in range(T):
            lo, hi = (torch.broadcast_to(torch.as_tensor(v), (n,)) for v in pattern.axis_bounds(t, d, u, n_g, p))
            lo, hi = torch.clamp(lo, min=0), torch.minimum(hi, n_g - 1)
            rows[D + 2 * (t * D + d)] = (g * m + lo)[coords[d]]
            rows[D + 2 * (t * D + d) + 1] = (g * m + hi)[coords[d]]
    return {"codes": torch.stack(rows).to(torch.int32).contiguous(), "layout": f"{T}x{D}"}


def block_boxes(length: int, block: int, grid: tuple[int, ...]):
    """Boxes covering each block of ``block`` consecutive tokens: ``lo, hi (nB, S, D)`` inclusive
    coordinates and ``ok (nB, S)`` (which slots hold a box); slots empty in every block are dropped."""
    starts = torch.arange(cdiv(length, block)) * block
    ends = torch.clamp(starts + block, max=length) - 1
    lo, hi, ok = _boxes(starts, ends, grid)
    used = ok.any(0)
    return lo[:, used], hi[:, used], ok[:, used]


def _boxes(s: torch.Tensor, e: torch.Tensor, shape: tuple[int, ...]):
    """Row-major index ranges ``[s, e]`` (inclusive, s <= e) as unions of boxes (see block_boxes)."""
    n = s.shape[0]
    if len(shape) == 1:
        return s.view(n, 1, 1), e.view(n, 1, 1), torch.ones(n, 1, dtype=torch.bool)
    inner = prod(shape[1:])
    s0, sr, e0, er = s // inner, s % inner, e // inner, e % inner
    same = s0 == e0
    head_whole = ~same & (sr == 0)  # first slab fully covered: it joins the middle run of slabs
    tail_whole = ~same & (er == inner - 1)
    h_lo, h_hi, h_ok = _boxes(sr, torch.where(same, er, torch.full_like(er, inner - 1)), shape[1:])
    t_lo, t_hi, t_ok = _boxes(torch.zeros_like(er), er, shape[1:])
    m_first = torch.where(head_whole, s0, s0 + 1)
    m_last = torch.where(tail_whole, e0, e0 - 1)
    rest = len(shape) - 1
    whole_lo = torch.zeros(n, 1, rest, dtype=torch.long)
    whole_hi = (torch.tensor(shape[1:]) - 1).view(1, 1, rest).expand(n, 1, rest)

    def lead(x, boxes):
        return torch.cat([x.view(n, 1, 1).expand(n, boxes.shape[1], 1), boxes], dim=2)

    lo = torch.cat([lead(s0, h_lo), lead(e0, t_lo), lead(m_first, whole_lo)], dim=1)
    hi = torch.cat([lead(s0, h_hi), lead(e0, t_hi), lead(m_last, whole_hi)], dim=1)
    ok = torch.cat([h_ok & ~head_whole[:, None], t_ok & (~same & ~tail_whole)[:, None],
                    (~same & (m_first <= m_last))[:, None]], dim=1)
    return lo, hi, ok


__all__ = ["SMALL_OP", "GridPattern", "block_boxes", "check_grid", "grid_coords", "grid_tables", "per_dim",
           "per_dim_flags", "table_rule"]
