"""Running a pattern in a token order it offers (:mod:`attnkit.patterns.order`), for the mask engines.

For a self-attention call whose pattern offers a :class:`~attnkit.patterns.order.TokenOrder`,
an engine gathers ``q``, ``k``, ``v`` ``(B, H, L, D)`` into the order (one ``index_select`` along
``L`` each), runs the order's pattern, and gathers the output back. A gather by a permutation is
exact and its gradient is the gather by the inverse permutation (no scatter-add), so outputs and
gradients equal the computation in the call's order up to the floating-point order of the sums
inside each row.

The call's order is kept, and the layout says why, when the call has an ``attn_mask`` or the
spec a ``score_mod`` (both index the call's order), when the engine's tiling is off, or when the
pattern offers no order for these lengths.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

from ..call import AttentionCall
from ..patterns.base import Pattern
from ..patterns.order import TokenOrder
from .flex_inputs import family_key, leaves, value_key
from .mask_spec import MaskSpec

CACHE_ENTRIES = 64


class _Gather(torch.autograd.Function):
    """``x.index_select(-2, index)`` whose backward gathers by ``inverse`` (a permutation)."""

    @staticmethod
    def forward(ctx, x, index, inverse):
        ctx.save_for_backward(inverse)
        return x.index_select(-2, index)

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        return grad.index_select(-2, inverse), None, None


def reorder(x: torch.Tensor, index: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """Tokens of ``x (B, H, L, D)`` in the order ``index`` (``inverse`` is its inverse)."""
    return _Gather.apply(x, index, inverse)


@dataclass(frozen=True)
class Layout:
    """How an engine runs one call: ``pattern`` over the tokens in ``index`` order (None: the
    call's order); ``note`` says which order and why."""

    pattern: Pattern
    note: str
    order: TokenOrder | None = None
    index: torch.Tensor | None = None
    inverse: torch.Tensor | None = None

    @property
    def reordered(self) -> bool:
        return self.index is not None


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
                index = order.order.to(call.device)
                layout = Layout(order.pattern, order.description, order, index, order.inverse.to(call.device))
            hit = self._cache[key] = (layout, raw)  # raw keeps the tensor ids in the key valid
            if len(self._cache) > CACHE_ENTRIES:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(key)
        return hit[0]


__all__ = ["Layout", "Layouts", "offers_order", "reorder"]
