"""Running a pattern in a token order it offers (:mod:`attnkit.patterns.order`), for the mask engines.

For a self-attention call whose pattern offers a :class:`~attnkit.patterns.order.TokenOrder`,
an engine moves ``q``, ``k``, ``v`` ``(B, H, L, D)`` into the order, runs the order's pattern, and
moves the output back. A token order moves whole *runs* of consecutive tokens (a grid's tiled
order: runs of ``tile[-1]`` tokens, one row of a tile), so a move is a gather of contiguous rows of
``run x D`` values: ``index_select`` along dim 0 of a ``(B H L / run, run D)`` view, one index per
run. Its gradient is the gather by the inverse permutation (no scatter-add). Exact: outputs and
gradients equal the computation in the call's order up to the floating-point order of the sums
inside each row.

Measured (H200, bf16, (1, 16, 32768, 128), 2-D grid (128, 256) in 16 x 8 tiles;
``scripts/gpu/profile_call.py``, ``scripts/gpu/bench_token_moves.py``): ``index_select`` along L
(one index per value, a generic gather kernel) took 0.21 ms per tensor, 0.85 ms of a 2.05 ms
neighbourhood forward; a reshape-permute copy 0.19 ms.

The call's order is kept, and the layout says why, when the call has an ``attn_mask`` or the
spec a ``score_mod`` (both index the call's order), when the engine's tiling is off, or when the
pattern offers no order for these lengths.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from ..call import AttentionCall
from ..patterns.base import Pattern
from .flex_inputs import family_key, leaves, value_key
from .mask_spec import MaskSpec

CACHE_ENTRIES = 64
ROW_INDEX_ENTRIES = 8  # row indices kept per layout, one per batch x heads seen


class _RowGather(torch.autograd.Function):
    """``x.index_select(0, index)`` (``x`` 2-D) whose backward gathers by ``inverse`` (a permutation)."""

    @staticmethod
    def forward(ctx, x, index, inverse):
        ctx.save_for_backward(inverse)
        return x.index_select(0, index)

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse), None, None


def run_length(order: torch.Tensor) -> int:
    """The longest ``r`` such that ``order`` moves aligned runs of ``r`` consecutive tokens:
    ``order[i r + j] = order[i r] + j`` and ``order[i r]`` a multiple of ``r`` (1 always works)."""
    L = order.numel()
    breaks = ((order[1:] != order[:-1] + 1).nonzero().flatten() + 1).tolist()
    g = math.gcd(L, *breaks)
    for r in (d for d in range(g, 0, -1) if g % d == 0):
        if bool((order[::r] % r == 0).all()):
            return r
    return 1


@dataclass(frozen=True)
class Layout:
    """How an engine runs one call: ``pattern`` over the tokens in a token order (``starts`` None:
    the call's order); ``note`` says which order and why. ``run`` tokens move together; ``starts[i]``
    is the run (of the call's order) that lands at run ``i``."""

    pattern: Pattern
    note: str
    run: int = 1
    starts: torch.Tensor | None = None
    _rows: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def reordered(self) -> bool:
        return self.starts is not None

    def _row_index(self, batch_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Row indices over a ``(batch_heads L / run, run D)`` view, and their inverse (cached)."""
        hit = self._rows.get(batch_heads)
        if hit is None:
            n = self.starts.numel()
            offsets = torch.arange(batch_heads, device=self.starts.device)[:, None] * n
            rows = (offsets + self.starts[None]).flatten()
            if len(self._rows) >= ROW_INDEX_ENTRIES:
                self._rows.pop(next(iter(self._rows)))
            hit = self._rows[batch_heads] = (rows, torch.argsort(rows))
        return hit

    def into_order(self, x: torch.Tensor) -> torch.Tensor:
        """``x (B, H, L, D)`` in the call's order -> in this layout's order."""
        rows, inverse = self._row_index(x.shape[0] * x.shape[1])
        return _RowGather.apply(x.reshape(-1, self.run * x.shape[-1]), rows, inverse).view(x.shape)

    def out_of_order(self, x: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`into_order`."""
        rows, inverse = self._row_index(x.shape[0] * x.shape[1])
        return _RowGather.apply(x.reshape(-1, self.run * x.shape[-1]), inverse, rows).view(x.shape)


def offers_order(pattern: Pattern) -> bool:
    return type(pattern).token_order is not Pattern.token_order


class Layouts:
    """Per engine: the layout of each (pattern configuration, lengths, block, device), cached."""

    def __init__(self):
        self._cache: OrderedDict = OrderedDict()

    def get(self, call: AttentionCall, spec: MaskSpec, block: tuple[int, int], enabled: bool) -> Layout:
        pattern = spec.pattern
        if not offers_order(pattern):
            return Layout(pattern, "call's token order")
        if not enabled:
            return Layout(pattern, "call's token order (token tiling off)")
        if call.attn_mask is not None or spec.score_mod is not None:
            what = "an attn_mask" if call.attn_mask is not None else "a score_mod"
            return Layout(pattern, f"call's token order ({what} indexes it, so the tiled order is not used)")
        raw = pattern.params(call.q_len, call.k_len)
        key = (family_key(pattern), pattern.describe(), value_key(leaves(raw)), call.q_len, call.k_len, block,
               str(call.device))
        hit = self._cache.get(key)
        if hit is None:
            order = pattern.token_order(call.q_len, call.k_len, block)
            if order is None:
                layout = Layout(pattern, "call's token order (no token order computes fewer tiles)")
            else:
                run = run_length(order.order)
                starts = (order.order[::run] // run).to(call.device)
                layout = Layout(order.pattern, f"{order.description}; moved in runs of {run} tokens", run, starts)
            hit = self._cache[key] = (layout, raw)  # raw keeps the tensor ids in the key valid
            if len(self._cache) > CACHE_ENTRIES:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(key)
        return hit[0]


__all__ = ["Layout", "Layouts", "offers_order", "run_length"]
