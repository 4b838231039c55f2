"""Patterns whose visible keys form one interval per query: full, causal, sliding window.

For a rule ``lo(q) <= k <= hi(q)`` with ``lo``/``hi`` nondecreasing in q, the block plan follows
from the bounds at each query block's first and last row (``interval_plan``): ``nQ x nK`` work.
"""

from __future__ import annotations

import torch

from ..errors import OptionError
from .base import Pattern
from .plan import cdiv, interval_plan

_BIG = 1 << 62


class IntervalPattern(Pattern):
    """Base: subclasses give ``bounds(qa, p) -> (lo, hi)`` for absolute query positions ``qa``
    (``q + offset``, bottom-right aligned), inclusive, nondecreasing in ``qa``."""

    causal: bool = False

    def bounds(self, qa, p):
        raise NotImplementedError

    def params(self, q_len, k_len):
        return {"offset": k_len - q_len, "causal": self.causal}

    def _bounds(self, q, p):
        qa = q + p["offset"]
        lo, hi = self.bounds(qa, p)
        if p["causal"]:
            hi = torch.minimum(hi, qa) if isinstance(hi, torch.Tensor) else torch.clamp(qa, max=hi)
        return lo, hi

    def rule(self, b, h, q, k, p):
        lo, hi = self._bounds(q, p)
        return (k >= lo) & (k <= hi)

    def _plan(self, q_len, k_len, block_q, block_k, device):
        p = self.params(q_len, k_len)
        nq = cdiv(q_len, block_q)
        first = torch.arange(nq, device=device) * block_q
        last = torch.clamp(first + block_q, max=q_len) - 1
        lo_f, hi_f = (torch.as_tensor(x, device=device).expand(nq) for x in self._bounds(first, p))
        lo_l, hi_l = (torch.as_tensor(x, device=device).expand(nq) for x in self._bounds(last, p))
        return interval_plan(lo_f, hi_l, lo_l, hi_f, k_len, block_k)


class Full(IntervalPattern):
    """Every key visible (causal: the bottom-right causal mask)."""

    def __init__(self, causal: bool = False):
        self.causal = causal

    def bounds(self, qa, p):
        return torch.zeros_like(qa), torch.full_like(qa, _BIG)

    def describe(self):
        return "causal" if self.causal else "full"


class SlidingWindow(IntervalPattern):
    """Key j visible to query i iff ``i - left <= j <= i + right`` (and ``j <= i`` if causal),
    with i the bottom-right aligned position of the query."""

    def __init__(self, left: int, right: int, causal: bool = False):
        self.left, self.right, self.causal = left, right, causal

    def params(self, q_len, k_len):
        return {**super().params(q_len, k_len), "left": self.left, "right": self.right}

    def bounds(self, qa, p):
        return qa - p["left"], qa + p["right"]

    def describe(self):
        c = ", causal" if self.causal else ""
        return f"sliding_window(left={self.left}, right={self.right}{c})"


def window_sides(window: int | None, left: int | None, right: int | None, causal: bool,
                 method: str = "sliding_window") -> tuple[int, int]:
    """Resolve the ``window`` shorthand: causal -> (window - 1, 0); noncausal ->
    (window // 2, window // 2). ``left``/``right`` are given explicitly otherwise."""
    if window is not None:
        if left is not None or right is not None:
            raise OptionError(
                f"method {method!r}: pass either window={window} or left/right, not both "
                f"(got left={left}, right={right}).")
        return (window - 1, 0) if causal else (window // 2, window // 2)
    if left is None and right is None:
        raise OptionError(
            f"method {method!r} needs a window: pass window=W, or left=L and/or right=R "
            "(key j visible to query i iff i-left <= j <= i+right).")
    return (left or 0), (right or 0)


def full(causal: bool = False) -> Full:
    return Full(causal)


def causal() -> Full:
    return Full(True)


def sliding_window(window: int | None = None, *, left: int | None = None, right: int | None = None,
                   causal: bool = False) -> SlidingWindow:
    """``window`` (causal: the last ``window`` keys including self; noncausal: ``window // 2``
    on each side) or explicit ``left`` / ``right``."""
    lft, rgt = window_sides(window, left, right, causal)
    return SlidingWindow(lft, rgt, causal)
