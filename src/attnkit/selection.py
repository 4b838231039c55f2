"""Exported selections of dynamic-sparsity methods: ``ak.select`` and :class:`Selection`.

A training-free dynamic method (MoBA, VMoBA, Kinetics, HiP, H2O, ...) first *selects* which keys
each query sees, from the data, then runs exact attention on that selection. ``ak.select`` runs
the first step alone and returns the selection, so it can be inspected, measured, reused or run::

    sel = ak.select(q, k, v, is_causal=True, method="moba", density=0.1, chunk_size=512)
    sel.density()              # fraction of the dense call's (query, key) pairs kept
    sel.tile_density(128)      # fraction of 128x128 tiles an engine visits
    sel.recall(q, k)           # (B, H) softmax mass of dense attention that the selection keeps
    out = sel.attend(q, k, v)  # attention on it (== ak.attend(q, k, v, is_causal=True, method="moba", ...))
    sel.mask()                 # (B, H, Lq, Lk) bool, small sizes only

Nothing here builds an ``Lq x Lk`` tensor except ``mask()``: counts and recalls run over chunks
of query rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from .errors import ArgumentError, ShapeError, UnsupportedPatternError

if TYPE_CHECKING:  # pragma: no cover
    from .patterns.base import Pattern
    from .patterns.plan import BlockPlan

# elements of one (B, H, rows, Lk) chunk evaluated at once by counts and recalls (CPU, CUDA)
CHUNK_ELEMENTS = {"cpu": 1 << 24, "cuda": 1 << 26}


@dataclass
class Selection:
    """What a dynamic-sparsity method selected for one call.

    ``pattern``: visibility in the call's token order, causal rule included (``(B, H, Lq, Lk)``
    after broadcasting). The engines run ``run_pattern`` on tensors permuted by ``order``
    (``(order_q, order_k)``, each ``(Hp, L)``: row r of the permuted query is query
    ``order_q[h, r]``) when ``order`` is given (VMoBA's 2-D/3-D blocks), else ``pattern`` itself.
    ``details`` holds method-specific facts (budgets per query, the chunk size, ...).
    ``score_mod(scores, b, h, q, k, *mod_tensors)`` is an optional additive score modification
    the engines apply on top of the mask (DMA's per-key bias); it may be differentiable through
    ``mod_tensors``.
    """

    method: str
    pattern: Pattern
    batch: int
    heads: int
    q_len: int
    k_len: int
    is_causal: bool
    block: int = 128
    device: torch.device | None = None
    run_pattern: Pattern | None = None
    order: tuple[torch.Tensor, torch.Tensor] | None = None
    details: dict[str, Any] = field(default_factory=dict)
    score_mod: Any = None
    mod_tensors: tuple[torch.Tensor, ...] = ()

    @property
    def executed(self) -> Pattern:
        """The pattern the engines run (in ``order`` when given)."""
        return self.pattern if self.run_pattern is None else self.run_pattern

    def mask(self, device=None) -> torch.Tensor:
        """The selection as a bool ``(B, H, Lq, Lk)`` tensor (small sizes: it is Lq x Lk)."""
        m = self.pattern.dense(self.q_len, self.k_len, device or self.device)
        return m.expand(self.batch, self.heads, self.q_len, self.k_len)

    def bias(self, device=None) -> torch.Tensor | None:
        """The score modification as a float64 ``(B, H, Lq, Lk)`` bias (None without one); for the
        oracle at small sizes. Differentiable through ``mod_tensors``."""
        if self.score_mod is None:
            return None
        dev = device or self.device
        zero = torch.zeros(self.batch, self.heads, self.q_len, self.k_len, dtype=torch.float64, device=dev)
        b = torch.arange(self.batch, device=dev).view(-1, 1, 1, 1)
        h = torch.arange(self.heads, device=dev).view(1, -1, 1, 1)
        q = torch.arange(self.q_len, device=dev).view(1, 1, -1, 1)
        k = torch.arange(self.k_len, device=dev).view(1, 1, 1, -1)
        return self.score_mod(zero, b, h, q, k, *[t.to(dev, torch.float64) for t in self.mod_tensors])

    def kept(self) -> torch.Tensor:
        """Visible keys per query ``(B, H, Lq)`` (int64), counted over chunks of rows."""
        parts = [m.sum(-1) for _, m in self._row_masks(None, self.device)]
        return torch.cat(parts, dim=-1)

    def density(self) -> float:
        """Kept (query, key) pairs over the pairs the dense call attends (all pairs, or the
        bottom-right causal ones): 1.0 is dense attention."""
        kept = float(self.kept().sum())
        return kept / max(1.0, float(self._dense_pairs()))

    def block_plan(self, block: int | tuple[int, int] = 128) -> BlockPlan:
        """Tile states of the executed pattern (in the engines' token order)."""
        return self.executed.block_plan(self.q_len, self.k_len, block, self.device)

    def tile_density(self, block: int | tuple[int, int] = 128) -> float:
        """Fraction of ``block x block`` tiles an engine visits (1.0: all tiles)."""
        states = self.block_plan(block).states
        return float((states > 0).float().expand(self.batch, self.heads, -1, -1).mean())

    def recall(self, query: torch.Tensor, key: torch.Tensor, scale: float | None = None,
               rows: torch.Tensor | None = None) -> torch.Tensor:
        """Softmax-mass recall ``(B, H)``: for each query, the probability mass that dense
        attention (causal if the call was) puts on the selected keys, averaged over queries
        (over ``rows`` only when given: a 1-D tensor of query indices, to bound the cost).
        Rows that see no key under dense attention are skipped. ``O(Lq Lk D)`` in chunks."""
        self._check_inputs(query, key)
        scale = query.shape[-1] ** -0.5 if scale is None else float(scale)
        group = query.shape[1] // key.shape[1]
        k = key.repeat_interleave(group, 1) if group > 1 else key
        wd = torch.float64 if query.dtype == torch.float64 else torch.float32
        total = torch.zeros(self.batch, self.heads, dtype=torch.float64, device=query.device)
        count = torch.zeros(self.batch, self.heads, dtype=torch.float64, device=query.device)
        for idx, sel in self._row_masks(rows, query.device):
            s = (query[:, :, idx].to(wd) @ k.to(wd).transpose(-1, -2)) * scale
            if self.is_causal:
                qa = idx.to(query.device)[:, None] + (self.k_len - self.q_len)
                s = s.masked_fill(torch.arange(self.k_len, device=query.device) > qa, float("-inf"))
            lse = torch.logsumexp(s, -1, keepdim=True)
            alive = torch.isfinite(lse)
            p = torch.where(alive, torch.exp(s - torch.where(alive, lse, 0.0)), 0.0)
            total += (p * sel).sum(-1).to(torch.float64).sum(-1)
            count += alive.squeeze(-1).to(torch.float64).sum(-1)
        return total / count.clamp_min(1.0)

    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float | None = None,
               backend: str = "auto") -> torch.Tensor:
        """Exact attention on this selection (``ak.attend`` of the method without re-selecting)."""
        from .backends.base import require, select
        from .call import AttentionCall
        from .registry import get_method

        self._check_inputs(query, key)
        call = AttentionCall.build(query, key, value, None, 0.0, self.is_causal, scale,
                                   query.shape[1] != key.shape[1])
        engines = get_method(self.method).engines()
        engine, why = select(self.method, call.pattern, engines, call, self, backend)
        return require(engine, why).run(call, self)

    # -- internals ----------------------------------------------------------------------------
    def _check_inputs(self, query, key) -> None:
        got = (query.shape[0], query.shape[1], query.shape[2], key.shape[2])
        want = (self.batch, self.heads, self.q_len, self.k_len)
        if got != want:
            raise ShapeError(f"this selection was made for (B, H, Lq, Lk) = {want}, got {got}.")

    def _dense_pairs(self) -> int:
        if not self.is_causal:
            return self.batch * self.heads * self.q_len * self.k_len
        qa = torch.arange(self.q_len) + (self.k_len - self.q_len)
        return self.batch * self.heads * int((qa + 1).clamp(0, self.k_len).sum())

    def _row_masks(self, rows: torch.Tensor | None, device=None):
        """Yield ``(row indices, bool (B, H, rows, Lk))`` over chunks of query rows."""
        p = self.pattern
        params = _to_device(p.params(self.q_len, self.k_len), device)
        rows = torch.arange(self.q_len, device=device) if rows is None else rows.to(device)
        budget = CHUNK_ELEMENTS.get(torch.device(device or "cpu").type, CHUNK_ELEMENTS["cpu"])
        step = max(1, budget // max(1, self.batch * self.heads * self.k_len))
        b = torch.arange(p.batch or 1, device=device).view(-1, 1, 1, 1)
        h = torch.arange(p.heads or 1, device=device).view(1, -1, 1, 1)
        k = torch.arange(self.k_len, device=device).view(1, 1, 1, -1)
        for start in range(0, rows.numel(), step):
            idx = rows[start:start + step]
            m = p.rule(b, h, idx.view(1, 1, -1, 1), k, params)
            yield idx, m.expand(self.batch, self.heads, idx.numel(), self.k_len)


def _to_device(params, device):
    from .patterns.base import _to_device as move

    return move(params, device)


def select(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor | None = None, attn_mask=None,
           is_causal: bool = False, scale: float | None = None, enable_gqa: bool = False, *,
           method: str, **options) -> Selection:
    """Run only the selection step of a dynamic-sparsity ``method`` (same arguments as
    ``ak.attend``; ``value`` is optional: selections never read values). Returns a
    :class:`Selection`; ``sel.attend(q, k, v)`` equals ``ak.attend`` with the same arguments."""
    from .call import AttentionCall
    from .registry import get_method

    impl = get_method(method)
    if not hasattr(impl, "select"):
        raise ArgumentError(
            f"method {method!r} exports no Selection (exact attention on selected keys); ak.select takes "
            "methods such as 'moba', 'vmoba', 'kinetics', 'hip', 'h2o', 'seer', 'dma'. Two-level methods "
            "('hcam', 'landmark') export their selection as ak.explain(...).plan.")
    if attn_mask is not None:
        raise ArgumentError(f"method {method!r} takes no attn_mask (selections ignore it); drop attn_mask.")
    value = key if value is None else value
    call = AttentionCall.build(query, key, value, None, 0.0, is_causal, scale, enable_gqa)
    if call.pattern not in impl.info.patterns:
        raise UnsupportedPatternError(
            f"method {method!r} does not support {call.pattern} attention (Lq={call.q_len}, Lk={call.k_len}, "
            f"is_causal={is_causal}); it supports: {', '.join(sorted(impl.info.patterns))}.")
    call = call.with_options(impl.info.options.validate(options, method))
    impl.validate(call)
    return impl.select(call)


__all__ = ["Selection", "select"]
