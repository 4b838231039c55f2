"""Patterns of dynamic-sparsity methods once their selection is made.

- :class:`BlockSelection`: a tile table ``(Bp, Hp, nQ, nK)`` over query blocks of ``block_q`` rows
  and key blocks of ``block_k`` columns (key blocks may start at an offset, e.g. after sink
  tokens). Key j is visible to query i iff tile ``(i // block_q, (j + key_shift) // block_k)`` is
  selected. ``block_q = 1`` gives a per-query selection (MoBA, Kinetics).
- :class:`EvictionTimes`: a KV-cache eviction history (H2O): key j is visible to queries
  ``j <= i < until[j]``.
- :class:`PermutedPattern`: a pattern defined on permuted token orders (VMoBA's 2-D / 3-D blocks),
  seen in the call's own order.
- :class:`BlockWindow`: the last ``window`` keys before each query block, causal (HiP).

Combine them with token-level rules the usual way (``selection & ak.patterns.causal()``).
Block plans are computed from the tables, never from an ``Lq x Lk`` mask: a table at other tile
sizes than the engine's is pooled (a tile is present if any selected block meets it, full if all
blocks meeting it are selected).
"""

from __future__ import annotations

import torch

from ..errors import ShapeError
from .base import Pattern
from .interval import IntervalPattern
from .plan import EMPTY, FULL, PARTIAL, cdiv


class BlockSelection(Pattern):
    """``tiles``: bool ``(Bp, Hp, nQ, nK)`` — True where the (query block, key block) is kept.

    ``key_shift`` moves the key-block grid: key j falls in block ``(j + key_shift) // block_k``,
    so with ``key_shift = (-s) % block_k`` the first key block is ``[0, s mod block_k)`` and the
    others start at ``s + m * block_k`` (blocks that begin after ``s`` sink tokens)."""

    def __init__(self, tiles: torch.Tensor, block_q: int, block_k: int | None = None, key_shift: int = 0):
        while tiles.dim() < 4:
            tiles = tiles.unsqueeze(0)
        self.tiles = tiles.to(torch.bool)
        self.block_q, self.block_k = block_q, block_k or block_q
        self.key_shift = key_shift
        self.batch = tiles.shape[0] if tiles.shape[0] > 1 else None
        self.heads = tiles.shape[1] if tiles.shape[1] > 1 else None

    def check(self, q_len, k_len):
        want = (cdiv(q_len, self.block_q), cdiv(k_len + self.key_shift, self.block_k))
        if tuple(self.tiles.shape[-2:]) != want:
            raise ShapeError(
                f"block selection has {tuple(self.tiles.shape[-2:])} tiles but Lq={q_len}, Lk={k_len} with "
                f"blocks ({self.block_q}, {self.block_k}) and key_shift={self.key_shift} need {want}.")

    def params(self, q_len, k_len):
        return {"tiles": self.tiles, "bq": self.block_q, "bk": self.block_k, "shift": self.key_shift}

    def rule(self, b, h, q, k, p):
        t = p["tiles"]
        return t[b.clamp(max=t.shape[0] - 1), h.clamp(max=t.shape[1] - 1), q // p["bq"],
                 (k + p["shift"]) // p["bk"]]

    def _plan(self, q_len, k_len, block_q, block_k, device):
        tiles = self.tiles.to(device) if device is not None else self.tiles
        if (block_q, block_k, self.key_shift) == (self.block_q, self.block_k, 0):
            return torch.where(tiles, FULL, EMPTY).to(torch.int8)
        any_k, all_k = _pool(tiles, tiles, -1, k_len, block_k, self.block_k, self.key_shift)
        present, full = _pool(any_k, all_k, -2, q_len, block_q, self.block_q, 0)
        return torch.where(full, FULL, torch.where(present, PARTIAL, EMPTY)).to(torch.int8)

    def describe(self):
        density = float(self.tiles.float().mean())
        return f"block_selection({self.block_q}x{self.block_k}, {density:.0%} of tiles)"


def _pool(x_any: torch.Tensor, x_all: torch.Tensor, dim: int, length: int, out_block: int,
          in_block: int, shift: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Reduce a block table along ``dim`` from blocks of ``in_block`` positions (grid shifted by
    ``shift``) to blocks of ``out_block`` positions: (any of ``x_any``, all of ``x_all``) over the
    input blocks that each output block meets. Only in-range positions ``[0, length)`` count."""
    n_out = cdiv(length, out_block)
    dev = x_any.device
    first = torch.arange(n_out, device=dev) * out_block
    last = torch.clamp(first + out_block, max=length) - 1
    lo, hi = (first + shift) // in_block, (last + shift) // in_block
    if shift == 0 and out_block % in_block == 0:  # aligned: a reshape
        per = out_block // in_block
        n_in = x_any.shape[dim]
        pad = n_out * per - n_in
        xa = torch.nn.functional.pad(x_any.movedim(dim, -1), (0, pad), value=False)
        xl = torch.nn.functional.pad(x_all.movedim(dim, -1), (0, pad), value=True)
        xa = xa.reshape(*xa.shape[:-1], n_out, per).any(-1)
        xl = xl.reshape(*xl.shape[:-1], n_out, per).all(-1)
        return xa.movedim(-1, dim), xl.movedim(-1, dim)
    width = int((hi - lo).max()) + 1
    idx = lo[:, None] + torch.arange(width, device=dev)
    ok = idx <= hi[:, None]
    idx = torch.minimum(idx, hi[:, None]).reshape(-1)
    ga = x_any.index_select(dim, idx).movedim(dim, -1).unflatten(-1, (n_out, width))
    gl = x_all.index_select(dim, idx).movedim(dim, -1).unflatten(-1, (n_out, width))
    return (ga & ok).any(-1).movedim(-1, dim), (gl | ~ok).all(-1).movedim(-1, dim)


class EvictionTimes(Pattern):
    """A KV cache that drops entries for good (H2O): key j is visible to query i iff
    ``j <= i < until[b, h, j]`` (bottom-right aligned query positions). ``until``: int64
    ``(Bp, Hp, Lk)``; ``until[j] >= Lk`` means never evicted."""

    def __init__(self, until: torch.Tensor):
        while until.dim() < 3:
            until = until.unsqueeze(0)
        self.until = until
        self.batch = until.shape[0] if until.shape[0] > 1 else None
        self.heads = until.shape[1] if until.shape[1] > 1 else None

    def check(self, q_len, k_len):
        if self.until.shape[-1] != k_len:
            raise ShapeError(f"eviction times cover {self.until.shape[-1]} keys but the call has Lk={k_len}.")

    def params(self, q_len, k_len):
        return {"until": self.until, "offset": k_len - q_len}

    def rule(self, b, h, q, k, p):
        u = p["until"]
        qa = q + p["offset"]
        return (k <= qa) & (qa < u[b.clamp(max=u.shape[0] - 1), h.clamp(max=u.shape[1] - 1), k])

    def _plan(self, q_len, k_len, block_q, block_k, device):
        until = self.until.to(device) if device is not None else self.until
        nk = cdiv(k_len, block_k)
        pad = nk * block_k - k_len
        u_max = torch.nn.functional.pad(until, (0, pad), value=-1).unflatten(-1, (nk, block_k)).amax(-1)
        u_min = torch.nn.functional.pad(until, (0, pad), value=1 << 62).unflatten(-1, (nk, block_k)).amin(-1)
        off = k_len - q_len
        first = torch.arange(cdiv(q_len, block_q), device=until.device) * block_q
        q_first = (first + off)[:, None]
        q_last = (torch.clamp(first + block_q, max=q_len) - 1 + off)[:, None]
        k_first = torch.arange(nk, device=until.device) * block_k
        k_last = torch.clamp(k_first + block_k, max=k_len) - 1
        # present is a superset (some key of the tile is old enough and some lives long enough);
        # full is exact (every key is visible to every row of the tile)
        present = (k_first <= q_last) & (u_max[..., None, :] > q_first)
        full = (k_last <= q_first) & (u_min[..., None, :] > q_last)
        return torch.where(full, FULL, torch.where(present, PARTIAL, EMPTY)).to(torch.int8)

    def describe(self):
        return "eviction_times"


class PermutedPattern(Pattern):
    """``inner`` is defined on permuted orders: row r of the permuted query is query
    ``order_q[h, r]``, column c of the permuted key is key ``order_k[h, c]`` (orders ``(Hp, L)``,
    ``Hp`` in {1, H}). Seen in the call's order: ``rule(q, k) = inner.rule(pos_q[q], pos_k[k])``
    with ``pos = argsort(order)``. Engines run ``inner`` on permuted tensors instead (tiles stay
    dense there); this view is for masks, densities and the oracle."""

    def __init__(self, inner: Pattern, order_q: torch.Tensor, order_k: torch.Tensor):
        self.inner = inner
        self.order_q, self.order_k = order_q.reshape(-1, order_q.shape[-1]), order_k.reshape(-1, order_k.shape[-1])
        self.pos_q, self.pos_k = torch.argsort(self.order_q, -1), torch.argsort(self.order_k, -1)
        self.batch = inner.batch
        hp = max(self.order_q.shape[0], self.order_k.shape[0])
        self.heads = inner.heads if hp == 1 else hp

    def check(self, q_len, k_len):
        if (self.order_q.shape[-1], self.order_k.shape[-1]) != (q_len, k_len):
            raise ShapeError(f"permuted pattern is defined for Lq={self.order_q.shape[-1]}, "
                             f"Lk={self.order_k.shape[-1]}, not ({q_len}, {k_len}).")
        self.inner.check(q_len, k_len)

    def params(self, q_len, k_len):
        return {"inner": self.inner.params(q_len, k_len), "pos_q": self.pos_q, "pos_k": self.pos_k}

    def rule(self, b, h, q, k, p):
        pq, pk = p["pos_q"], p["pos_k"]
        return self.inner.rule(b, h, pq[h.clamp(max=pq.shape[0] - 1), q], pk[h.clamp(max=pk.shape[0] - 1), k],
                               p["inner"])

    def describe(self):
        return f"permuted({self.inner.describe()})"


class BlockWindow(IntervalPattern):
    """The last ``window`` keys of each query block, causal (HiP's sliding window): key j is
    visible to query i iff ``last(i) - window < j <= i``, where ``last(i)`` is the bottom-right
    position of the last query of i's block of ``block_q`` rows. ``block_q = 1`` is the usual
    causal sliding window of ``window`` keys."""

    causal = True

    def __init__(self, window: int, block_q: int):
        self.window, self.block_q = window, block_q

    def params(self, q_len, k_len):
        return {**super().params(q_len, k_len), "window": self.window, "bq": self.block_q, "q_len": q_len}

    def bounds(self, qa, p):
        q = qa - p["offset"]
        last = torch.clamp((q // p["bq"] + 1) * p["bq"], max=p["q_len"]) - 1 + p["offset"]
        return last + 1 - p["window"], torch.full_like(qa, 1 << 62)

    def describe(self):
        return f"block_window({self.window}, block_q={self.block_q})"
