"""Neighborhood Attention (NATTEN) and Generalized Neighborhood Attention (GNA) over a 1-D/2-D/3-D grid.

Tokens are the grid's cells in row-major order (see :mod:`attnkit.patterns.grid`). Along each
dimension of size ``n`` with kernel ``K``, dilation ``d``, stride ``s`` and causal flag ``c``, a
query at coordinate ``x`` sees the key at ``y`` iff both lie in the same dilation group
(``x % d == y % d``) and, with ``u = x // d``, ``v = y // d`` their coordinates inside the group of
``n_g = ceil((n - x % d) / d)`` cells:

- non-causal: ``centre - left <= v <= centre + right`` with ``left = K // 2``,
  ``right = K - 1 - left`` (even ``K``: one more key on the left), where the stride group's leader
  ``min((u // s) * s + s // 2, n_g - 1)`` (the centre query; the right one of two when ``s`` is even)
  is clamped to ``[left, n_g - 1 - right]``: the window shifts at the borders so every query keeps
  exactly ``K`` keys;
- causal: ``leader - K < v <= u`` with leader ``min((u // s) * s + s - 1, n_g - 1)`` (the last query
  of the stride group); the window is not shifted, so queries near the start see fewer keys.

The N-D mask is the AND over dimensions. ``s = 1`` is sliding-window NA, ``s = K`` blocked
(window) attention; every query of a stride group shares its leader's window (GNA).

Confirmed in SHI-Labs/NATTEN: ``src/natten/backends/flex.py`` (``get_na_flex_mask``,
``single_dim_tiling_mask``: leaders, clamped window centre, causal window, dilation-group sizes
``n // d + 1 - ((g + d - n % d) // d)``) and the reference kernel's mask
``csrc/include/natten/cuda/reference/mask.hpp`` (``get_win_start`` / ``get_win_end``: the same
windows as ``[start, start + K)`` resp. ``[max(leader - K + 1, 0), u]``); argument checks in
``src/natten/utils/checks.py`` (``K * d <= n`` per dimension, ``1 <= s <= K``, ``d >= 1``, same
layout for q and kv, i.e. self-attention only). NATTEN also requires ``K >= 2``; attnkit allows
``K = 1`` (along that dimension a query sees only its own coordinate), so any length has a valid
layout. Papers: NAT arXiv 2204.07143, DiNAT 2209.15001, FNA 2403.04690, GNA 2504.16922.
"""

from __future__ import annotations

import torch

from ..errors import OptionError
from .grid import GridPattern, _fmt, per_dim, per_dim_flags


class Neighborhood(GridPattern):
    """NATTEN / GNA mask over ``grid`` (see module doc); ``causal`` is a bool or one per dimension."""

    name = "neighborhood"

    def __init__(self, grid, kernel_size, dilation=1, stride=1, causal=False):
        super().__init__(grid)
        D = self.rank
        self.kernel_size = per_dim(kernel_size, D, "kernel_size", owner=self.name)
        self.dilation = per_dim(dilation, D, "dilation", owner=self.name)
        self.stride = per_dim(stride, D, "stride", owner=self.name)
        self.causal = per_dim_flags(causal, D, "causal", owner=self.name)
        for i, (n, k, d, s) in enumerate(zip(self.grid, self.kernel_size, self.dilation, self.stride)):
            if k * d > n:
                raise OptionError(
                    f"neighborhood: kernel_size * dilation = {k} * {d} = {k * d} exceeds grid size {n} along "
                    f"dimension {i} (grid={self.grid}); NATTEN needs kernel_size * dilation <= size per "
                    f"dimension. Use kernel_size <= {n // d} there.")
            if s > k:
                raise OptionError(
                    f"neighborhood: stride {s} > kernel_size {k} along dimension {i}; GNA needs "
                    f"1 <= stride <= kernel_size (stride = kernel_size is blocked attention).")

    def settings(self, q_len, k_len):
        return {**super().settings(q_len, k_len), "dilation": torch.tensor(self.dilation),
                "kernel": torch.tensor(self.kernel_size), "stride": torch.tensor(self.stride),
                "causal": torch.tensor(self.causal)}

    def axis_bounds(self, term, d, u, n, p):
        K, s, causal = p["kernel"][d], p["stride"][d], p["causal"][d]
        left = K // 2
        right = K - 1 - left
        first = (u // s) * s
        centre = torch.minimum(first + s // 2, n - 1)
        centre = torch.minimum(torch.maximum(centre, left), n - 1 - right)
        leader = torch.minimum(first + s - 1, n - 1)
        lo = torch.where(causal, leader - K + 1, centre - left)
        hi = torch.where(causal, u, centre + right)
        return lo, hi

    def describe(self):
        parts = [self._grid_text(), f"kernel_size={_fmt(self.kernel_size)}"]
        if any(d != 1 for d in self.dilation):
            parts.append(f"dilation={_fmt(self.dilation)}")
        if any(s != 1 for s in self.stride):
            parts.append(f"stride={_fmt(self.stride)}")
        if any(self.causal):
            parts.append(f"causal={_fmt(self.causal)}")
        return f"neighborhood({', '.join(parts)})"


def neighborhood(grid, kernel_size, dilation=1, stride=1, causal=False) -> Neighborhood:
    """Neighborhood attention over ``grid`` (tokens row-major); each of ``kernel_size``,
    ``dilation``, ``stride`` (GNA) is an int or one per dimension; ``causal`` a bool or one per
    dimension (video, causal in time only: ``causal=(True, False, False)``)."""
    return Neighborhood(grid, kernel_size, dilation, stride, causal)


def window_1d(x: int, n: int, kernel: int, dilation: int = 1, stride: int = 1, causal: bool = False) -> list[int]:
    """The keys (coordinates) query ``x`` sees along one dimension, computed the way NATTEN's
    reference kernel does (window start and end per query, then the dilation group); the readable
    reference of :class:`Neighborhood` (plain ints, no tensors)."""
    g, u = x % dilation, x // dilation
    n_g = len(range(g, n, dilation))
    left, right = kernel // 2, kernel - 1 - kernel // 2
    if causal:
        leader = min((u // stride) * stride + stride - 1, n_g - 1)
        start, end = max(leader - kernel + 1, 0), min(u + 1, n_g)
    else:
        leader = min((u // stride) * stride + stride // 2, n_g - 1)
        start = max(leader - left, 0)
        if leader + right >= n_g:  # shift left at the far border
            start += n_g - right - leader - 1
        end = start + kernel
    return [g + v * dilation for v in range(start, end)]


__all__ = ["Neighborhood", "neighborhood", "window_1d"]
