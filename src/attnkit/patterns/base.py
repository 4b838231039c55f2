"""Pattern objects: a boolean visibility rule over (batch, head, query, key).

A Pattern answers three questions without building an ``Lq x Lk`` tensor where it can avoid it:

- ``rule(b, h, q, k, p)``: is key ``k`` visible to query ``q``? Vectorized over broadcastable
  integer tensors (FlexAttention's ``mask_mod``, batched). Every number comes from
  ``p = params(q_len, k_len)``, never from ``self``, so a compiled kernel can take the numbers as
  tensors and one compiled kernel serves every configuration of a pattern family.
- ``block_plan(q_len, k_len, block)``: tile states (see :mod:`attnkit.patterns.plan`),
  analytic for structured patterns.
- ``to_dense(q_len, k_len)``: the mask itself, for tests and pictures only.

Engines evaluate the rule only at in-range positions (``0 <= q < Lq``, ``0 <= k < Lk``). Row index ``q`` and column index ``k`` are positions in the call's tensors; patterns that follow
attnkit's bottom-right convention place query ``q`` at key position ``q + k_len - q_len``.
Patterns compose with ``&`` and ``|``; ``heads`` / ``batch`` are set when the rule depends on
the head or batch index (S2-Attention shards, document ids).
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import ShapeError
from .plan import EMPTY, FULL, BlockPlan, cdiv, plan_from_dense

# elements of an evaluated mask chunk in the generic block-plan fallback
_CHUNK_ELEMENTS = 1 << 24


class Pattern:
    """Base class; subclasses implement ``params`` and ``rule`` and, where they can, ``_plan``."""

    heads: int | None = None
    batch: int | None = None

    # -- to implement ----------------------------------------------------------------------
    def params(self, q_len: int, k_len: int) -> dict[str, Any]:
        """Numbers (ints, floats, or tensors indexed by b / h / q / k) the rule reads."""
        return {}

    def rule(self, b, h, q, k, p: dict[str, Any]) -> torch.Tensor:
        raise NotImplementedError

    def _plan(self, q_len: int, k_len: int, block_q: int, block_k: int, device) -> torch.Tensor | None:
        """Analytic tile states ``(Bp, Hp, nQ, nK)`` or None to use the generic evaluation."""
        return None

    def check(self, q_len: int, k_len: int) -> None:
        """Raise ShapeError/OptionError when the pattern cannot apply to these lengths."""

    def token_order(self, q_len: int, k_len: int, block: int | tuple[int, int] = 128):
        """A :class:`~attnkit.patterns.order.TokenOrder` under which this pattern computes fewer
        tiles of ``block`` tokens (engines gather q, k, v into it, run its pattern and gather the
        output back), or None to keep the call's order (the default)."""
        return None

    def describe(self) -> str:
        return type(self).__name__

    # -- derived ---------------------------------------------------------------------------
    def __repr__(self) -> str:
        return self.describe()

    def __and__(self, other: Pattern) -> Pattern:
        return Intersection(self, other)

    def __or__(self, other: Pattern) -> Pattern:
        return Union(self, other)

    def check_heads(self, batch: int, heads: int) -> None:
        if self.heads is not None and self.heads not in (1, heads):
            raise ShapeError(f"pattern {self.describe()} is defined for {self.heads} heads but the call has {heads}.")
        if self.batch is not None and self.batch not in (1, batch):
            raise ShapeError(f"pattern {self.describe()} is defined for batch {self.batch} but the call has {batch}.")

    def mask(self, b, h, q, k, q_len: int, k_len: int) -> torch.Tensor:
        """The rule at concrete lengths (the parameters are computed here)."""
        return self.rule(b, h, q, k, self.params(q_len, k_len))

    def index_grid(self, q_len: int, k_len: int, device=None, q_start: int = 0, q_stop: int | None = None):
        q_stop = q_len if q_stop is None else q_stop
        b = torch.arange(self.batch or 1, device=device).view(-1, 1, 1, 1)
        h = torch.arange(self.heads or 1, device=device).view(1, -1, 1, 1)
        q = torch.arange(q_start, q_stop, device=device).view(1, 1, -1, 1)
        k = torch.arange(k_len, device=device).view(1, 1, 1, -1)
        return b, h, q, k

    def dense(self, q_len: int, k_len: int, device=None) -> torch.Tensor:
        """The mask as a ``(Bp, Hp, Lq, Lk)`` bool tensor (Bp, Hp in {1, B/H})."""
        self.check(q_len, k_len)
        b, h, q, k = self.index_grid(q_len, k_len, device)
        m = self.rule(b, h, q, k, _to_device(self.params(q_len, k_len), device))
        return m.expand(b.shape[0], h.shape[1], q_len, k_len)

    def to_dense(self, q_len: int, k_len: int | None = None, device=None) -> torch.Tensor:
        """The mask, ``(Lq, Lk)`` for head-independent patterns, ``(H, Lq, Lk)`` per head,
        ``(B, H, Lq, Lk)`` per batch element. For tests and pictures; it is ``Lq x Lk``."""
        k_len = q_len if k_len is None else k_len
        m = self.dense(q_len, k_len, device)
        if self.batch is None:
            m = m[0]
            if self.heads is None:
                m = m[0]
        return m

    def block_plan(self, q_len: int, k_len: int | None = None, block: int | tuple[int, int] = 128,
                   device=None) -> BlockPlan:
        """Which tiles are empty / partial / full; analytic where the pattern allows."""
        k_len = q_len if k_len is None else k_len
        block_q, block_k = (block, block) if isinstance(block, int) else block
        self.check(q_len, k_len)
        states = self._plan(q_len, k_len, block_q, block_k, device)
        if states is None:
            return self._generic_plan(q_len, k_len, block_q, block_k, device)
        while states.dim() < 4:
            states = states.unsqueeze(0)
        return BlockPlan(states.to(torch.int8), q_len, k_len, block_q, block_k)

    def _generic_plan(self, q_len, k_len, block_q, block_k, device) -> BlockPlan:
        """Evaluate the rule in bounded chunks of query blocks (O(Lq Lk) time, bounded memory)."""
        p = _to_device(self.params(q_len, k_len), device)
        per_row = k_len * (self.batch or 1) * (self.heads or 1)
        rows = max(block_q, (_CHUNK_ELEMENTS // max(per_row, 1)) // block_q * block_q)
        parts = []
        for start in range(0, q_len, rows):
            stop = min(q_len, start + rows)
            b, h, q, k = self.index_grid(q_len, k_len, device, start, stop)
            m = self.rule(b, h, q, k, p).expand(b.shape[0], h.shape[1], stop - start, k_len)
            parts.append(plan_from_dense(m, block_q, block_k).states)
        return BlockPlan(torch.cat(parts, dim=-2), q_len, k_len, block_q, block_k)

    def density(self, q_len: int, k_len: int | None = None, block: int = 128, device=None) -> float:
        """Fraction of visible (query, key) pairs, counted tile by tile (no Lq x Lk tensor)."""
        k_len = q_len if k_len is None else k_len
        plan = self.block_plan(q_len, k_len, block, device)
        p = _to_device(self.params(q_len, k_len), device)
        sizes_q = _block_sizes(q_len, plan.block_q, device)
        sizes_k = _block_sizes(k_len, plan.block_k, device)
        area = sizes_q[:, None] * sizes_k[None, :]
        states = plan.states.expand(self.batch or 1, self.heads or 1, -1, -1)
        total = float((area * (states == FULL)).sum())
        partial = (states == 1).nonzero().tolist()
        for bi, hi, qi, ki in partial:
            q = torch.arange(qi * plan.block_q, min(q_len, (qi + 1) * plan.block_q), device=device)[:, None]
            k = torch.arange(ki * plan.block_k, min(k_len, (ki + 1) * plan.block_k), device=device)[None, :]
            b = torch.tensor(bi, device=device)
            h = torch.tensor(hi, device=device)
            total += float(self.rule(b, h, q, k, p).expand(q.shape[0], k.shape[1]).sum())
        return total / (q_len * k_len * (self.batch or 1) * (self.heads or 1))

    def render(self, q_len: int, k_len: int | None = None, width: int = 64, head: int = 0) -> str:
        """A text picture of the mask: '█' all visible, '▓'/'▒'/'░' partly, '·' none."""
        k_len = q_len if k_len is None else k_len
        rows, cols = min(q_len, width // 2), min(k_len, width)
        bq, bk = cdiv(q_len, rows), cdiv(k_len, cols)
        plan = self.block_plan(q_len, k_len, (bq, bk))
        if q_len * k_len <= (1 << 22):
            m = self.dense(q_len, k_len)[0, min(head, (self.heads or 1) - 1)].float()
            frac = _pool(m, bq, bk)
        else:
            frac = plan.states[0, min(head, plan.states.shape[1] - 1)].float() / 2
        chars = " ░▒▓█"
        lines = []
        for row in frac.tolist():
            lines.append("".join("·" if x == 0 else chars[min(4, max(1, round(x * 4)))] for x in row))
        return f"{self.describe()}  Lq={q_len} Lk={k_len}\n" + "\n".join(lines)

    def plot(self, q_len: int, k_len: int | None = None, path=None, head: int = 0, ax=None):
        """A PNG picture of the mask (matplotlib), saved to ``path`` when given."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        k_len = q_len if k_len is None else k_len
        m = self.dense(q_len, k_len)[0, min(head, (self.heads or 1) - 1)]
        own = ax is None
        if own:
            fig, ax = plt.subplots(figsize=(4, 4 * q_len / max(k_len, 1) + 0.4))
        ax.imshow(m.cpu().numpy(), cmap="Blues", interpolation="nearest", aspect="auto")
        ax.set_title(self.describe(), fontsize=8)
        ax.set_xlabel("key")
        ax.set_ylabel("query")
        if own:
            fig.tight_layout()
            if path is not None:
                fig.savefig(path, dpi=120)
            plt.close(fig)
        return ax


def _block_sizes(length: int, block: int, device) -> torch.Tensor:
    starts = torch.arange(cdiv(length, block), device=device) * block
    return (torch.clamp(starts + block, max=length) - starts).to(torch.float64)


def _pool(m: torch.Tensor, bq: int, bk: int) -> torch.Tensor:
    Lq, Lk = m.shape
    pad = torch.full((cdiv(Lq, bq) * bq, cdiv(Lk, bk) * bk), float("nan"))
    pad[:Lq, :Lk] = m
    t = pad.view(cdiv(Lq, bq), bq, cdiv(Lk, bk), bk)
    return torch.nanmean(t.transpose(1, 2).reshape(t.shape[0], t.shape[2], -1), dim=-1)


def _to_device(p: dict[str, Any], device) -> dict[str, Any]:
    if device is None:
        return p
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else
                _to_device(v, device) if isinstance(v, dict) else v) for k, v in p.items()}


class _Combined(Pattern):
    op_name = ""

    def __init__(self, a: Pattern, b: Pattern):
        self.a, self.b = a, b
        self.heads = _merge_dim(a.heads, b.heads, "heads")
        self.batch = _merge_dim(a.batch, b.batch, "batch")

    def params(self, q_len, k_len):
        return {"a": self.a.params(q_len, k_len), "b": self.b.params(q_len, k_len)}

    def check(self, q_len, k_len):
        self.a.check(q_len, k_len)
        self.b.check(q_len, k_len)

    def describe(self):
        return f"({self.a.describe()} {self.op_name} {self.b.describe()})"


class Intersection(_Combined):
    """Visible where both patterns are visible (``a & b``)."""

    op_name = "&"

    def rule(self, b, h, q, k, p):
        return self.a.rule(b, h, q, k, p["a"]) & self.b.rule(b, h, q, k, p["b"])

    def _plan(self, q_len, k_len, block_q, block_k, device):
        pa = self.a.block_plan(q_len, k_len, (block_q, block_k), device)
        pb = self.b.block_plan(q_len, k_len, (block_q, block_k), device)
        return (pa & pb).states


class Union(_Combined):
    """Visible where either pattern is visible (``a | b``)."""

    op_name = "|"

    def rule(self, b, h, q, k, p):
        return self.a.rule(b, h, q, k, p["a"]) | self.b.rule(b, h, q, k, p["b"])

    def _plan(self, q_len, k_len, block_q, block_k, device):
        pa = self.a.block_plan(q_len, k_len, (block_q, block_k), device)
        pb = self.b.block_plan(q_len, k_len, (block_q, block_k), device)
        return (pa | pb).states


def _merge_dim(x: int | None, y: int | None, what: str) -> int | None:
    if x is None or x == 1:
        return y
    if y is None or y == 1 or x == y:
        return x
    raise ShapeError(f"cannot combine patterns defined for {x} and {y} {what}")


__all__ = ["Pattern", "Intersection", "Union", "BlockPlan", "EMPTY", "FULL"]
