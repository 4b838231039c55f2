"""Shared machinery of training-free dynamic-sparsity methods: select, then attend exactly.

A method subclasses :class:`DynamicMethod` and implements ``select(call) -> Selection``
(:mod:`attnkit.selection`): from the data it builds a Pattern — usually a
:class:`~attnkit.patterns.BlockSelection` tile table composed with the causal rule — and the
shared mask engines (blocksparse, dense, and flex where available) run exact attention on it.
The method is ``kind="exact"``: ``oracle_inputs(call)`` is the selected mask, so the generic tests
check "selection, then the float64 oracle on that mask". The selection is not differentiable;
gradients flow through the attention on the selected mask. ``ak.select`` exports the selection.

Budgets. Every method accepts ``density`` in (0, 1]: the fraction of its candidate key blocks
(or tokens) each query (or query block) keeps, rounded up, at least one; ``density=1`` is dense
attention. It replaces the method's own budget knob; giving both raises OptionError
(:func:`resolve_budget`); giving neither uses the paper's default knob.

    method     density counts                                          the paper's knob
    moba       a query's visible chunks (its own + complete past)      top_k chunks (own included)
    kinetics   a query's dynamic chunks (between sinks and window)     top_k chunks
    hip        a query block's chunks in its search range              budget tokens (mask_k)
    vmoba      chunks per query (x S per head, x H*S for scope all)    top_k chunks (top-k mode)
    h2o        the sequence: cache = ceil(density * Lk) tokens          heavy + recent tokens
    seer       a query block's visible key blocks                      threshold / nz_ratio
    dma        the keys: window = ceil(density * Lk)                   window (keys per query)

(hcam and landmark, two-level methods outside this base, count a query's eligible chunks /
past blocks the same way, in place of top_k.) A selection may carry an additive score
modification (``Selection.score_mod``; DMA's per-key bias), which the engines apply and the
oracle receives as ``bias``.

Execution cost. The engines visit every (query tile, key tile) pair that any query of the
tile needs. Per-query selections (MoBA, Kinetics, VMoBA, HiP with ``query_chunk=1``) united over
a 128-row tile cover most key tiles unless neighbouring queries choose alike — on random inputs
the tile density (``Selection.tile_density()``) is close to dense even at 10 % kept pairs. The
official MoBA / VMoBA kernels gather, for each key chunk, the queries that chose it (varlen
FlashAttention); attnkit's tile engines do not, so their attention time follows the tile density.
Methods whose executed pattern is a per-query selection (moba, kinetics, vmoba: backends
``PER_QUERY_BACKENDS``) also offer the ``varlen`` engine (:mod:`attnkit.backends.varlen`), whose
work follows the kept key blocks instead; ``backend="auto"`` picks it on CPU when the selection
keeps few enough keys for its block size to beat blocksparse there, and keeps flex on GPUs.

What a method always keeps on top (its own chunk, sinks, windows, the query itself) is outside
the budget, so the kept density of a call (``Selection.density()``) is at least the target.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from ...backends.mask_spec import DEFAULT_BLOCK
from ...backends.varlen import VarlenEngine
from ...call import AttentionCall
from ...errors import OptionError
from ...options import Option
from ...patterns.base import Pattern
from ...patterns.plan import cdiv
from ...selection import Selection
from ..pattern_method import MASK_ENGINES, PatternMethod

# elements of one score chunk built at once by the selection code (CPU, CUDA)
SCORE_BUDGET = {"cpu": 1 << 24, "cuda": 1 << 26}


def density_option(candidates: str) -> Option:
    """The shared ``density`` option; ``candidates`` says what the fraction is of."""
    return Option("density", "float", None, f"fraction of {candidates} kept, rounded up (1 = dense "
                  "attention); replaces the paper's budget knob (giving both is an error)",
                  low=0.0, high=1.0, open_low=True, nullable=True)


def resolve_budget(method: str, options: dict[str, Any], knob: str, default: Any) -> tuple[str, Any]:
    """``("density", d)`` or ``(knob, value)``: which budget rules a call. Both given raises
    OptionError; neither gives ``(knob, default)`` (the paper's default)."""
    o = options
    if o["density"] is not None and o[knob] is not None:
        raise OptionError(
            f"method {method!r}: pass either density={o['density']} or {knob}={o[knob]}, not both — "
            f"density sets the budget as a fraction of the candidates, {knob} as the paper's count.")
    if o["density"] is not None:
        return "density", o["density"]
    return knob, default if o[knob] is None else o[knob]


def budget_from_density(density: float, candidates: torch.Tensor) -> torch.Tensor:
    """``ceil(density * n)`` kept of ``n`` candidates, at least 1 where ``n >= 1`` (int64)."""
    n = candidates.to(torch.int64)
    kept = torch.ceil(n.to(torch.float64) * density - 1e-9).to(torch.int64)
    return torch.minimum(torch.clamp(kept, min=1), n).clamp(min=0)


def work_dtype(t: torch.Tensor) -> torch.dtype:
    """Selections score in float64 for float64 inputs, float32 otherwise."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def rows_per_chunk(per_row: int, device: torch.device) -> int:
    """Rows of ``per_row`` scores each that fit one chunk of the device's score budget."""
    return max(1, SCORE_BUDGET.get(device.type, SCORE_BUDGET["cpu"]) // max(1, per_row))


@contextmanager
def serial_on_cpu(device: torch.device) -> Iterator[None]:
    """Run a sequential loop of tiny tensor ops (H2O's per-token eviction) on one CPU thread.

    Each op touches a few hundred numbers: an OpenMP parallel region costs more than it saves,
    and stalls whenever the machine's cores are busy (measured on a loaded 2-core machine:
    ``torch.softmax`` of 12 numbers took 30 ms with 2 threads, 2 us with one; the whole H2O
    selection of 63 tokens ran 30x slower). The thread count is restored afterwards; CUDA
    tensors are unaffected."""
    threads = torch.get_num_threads()
    if device.type != "cpu" or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def key_means(key: torch.Tensor, block: int, shift: int = 0) -> torch.Tensor:
    """Mean key of each block ``(B, Hk, nBlocks, D)``: block m holds keys
    ``[m*block - shift, (m+1)*block - shift)`` that exist (partial blocks average their real keys)."""
    B, Hk, L, D = key.shape
    n = cdiv(L + shift, block)
    k = torch.nn.functional.pad(key.to(work_dtype(key)), (0, 0, shift, n * block - L - shift))
    sums = k.view(B, Hk, n, block, D).sum(3)
    starts = torch.arange(n, device=key.device) * block - shift
    sizes = torch.clamp(starts + block, max=L) - torch.clamp(starts, min=0)
    return sums / sizes.clamp(min=1).to(sums.dtype)[:, None]


def top_k_mask(scores: torch.Tensor, k: torch.Tensor | int) -> torch.Tensor:
    """Bool mask of the ``k`` largest finite entries along the last dim (``k`` per row, an int
    tensor broadcastable to ``scores.shape[:-1]``); ``-inf`` entries are never kept."""
    n = scores.shape[-1]
    k = torch.as_tensor(k, device=scores.device).clamp(0, n)
    kmax = int(k.max()) if k.numel() else 0
    out = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    if kmax == 0:
        return out
    vals, idx = scores.topk(kmax, dim=-1)
    keep = (torch.arange(kmax, device=scores.device) < k[..., None]) & (vals > float("-inf"))
    return out.scatter(-1, idx, keep)


def by_query_head(t: torch.Tensor, group: int) -> torch.Tensor:
    """Per-kv-head tables ``(B, Hk, ...)`` repeated to the query heads ``(B, H, ...)``."""
    return t if group == 1 else t.repeat_interleave(group, dim=1)


class SelectionEngine:
    """Runs a :class:`Selection` on one mask engine; tokens are permuted first when the
    selection runs in its own order (VMoBA), and the output permuted back."""

    def __init__(self, inner):
        self.inner, self.name = inner, inner.name
        self.compiles = getattr(inner, "compiles", False)
        if hasattr(inner, "auto_skip"):
            self.auto_skip = lambda call, sel: inner.auto_skip(*self._inner_args(call, sel))

    def _inner_args(self, call: AttentionCall, sel: Selection):
        from ...backends.mask_spec import MaskSpec

        spec = MaskSpec(sel.executed, sel.score_mod, tuple(sel.mod_tensors), block=sel.block)
        if sel.order is None:
            return call, spec
        if sel.score_mod is not None:
            raise NotImplementedError("a permuted selection with a score modification is not supported")
        order_q, order_k = sel.order
        q = _permute(call.query, order_q)
        k, v = call.key, call.value
        if order_k.shape[0] > 1 and call.group > 1:
            k, v = call.expanded_kv()
        k, v = _permute(k, order_k), _permute(v, order_k)
        inner = AttentionCall.build(q, k, v, None, 0.0, call.is_causal, call.scale, q.shape[1] != k.shape[1])
        return inner.with_options(call.options), spec

    def can_run(self, call: AttentionCall, sel: Selection) -> str | None:
        return self.inner.can_run(*self._inner_args(call, sel))

    def run(self, call: AttentionCall, sel: Selection) -> torch.Tensor:
        out = self.inner.run(*self._inner_args(call, sel))
        if sel.order is None:
            return out
        return _permute(out, torch.argsort(sel.order[0], -1))


def _permute(x: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """``x (B, H, L, D)`` reordered along L: row r of the result is row ``order[h, r]``."""
    if order.shape[0] == 1:
        return x.index_select(2, order[0])
    idx = order[None, :, :, None].expand(x.shape[0], -1, -1, x.shape[-1])
    return torch.gather(x, 2, idx)


# every engine a selection can run on, in auto's order; a method runs those its info.backends names.
# Per-query selections (BlockSelection with block_q = 1) also list ``varlen``, before blocksparse:
# ``auto`` takes it on CPU where it predicts it faster (flex keeps GPUs; see backends/varlen.py)
SELECTION_ENGINES = (SelectionEngine(MASK_ENGINES[0]), SelectionEngine(VarlenEngine()),
                     *(SelectionEngine(e) for e in MASK_ENGINES[1:]))
PER_QUERY_BACKENDS = tuple(e.name for e in SELECTION_ENGINES)


class DynamicMethod(PatternMethod):
    """Base of training-free dynamic-sparsity methods. Subclasses implement ``select(call)``
    and ``check_options(call)`` (cross-option checks that need the call's shapes); the engines
    are those of ``SELECTION_ENGINES`` that ``info.backends`` names (``PER_QUERY_BACKENDS`` adds
    ``varlen`` to the mask engines)."""

    def select(self, call: AttentionCall) -> Selection:
        raise NotImplementedError

    def check_options(self, call: AttentionCall) -> None:
        """Raise OptionError for invalid option combinations (no selection work here)."""

    def engines(self):
        return tuple(e for e in SELECTION_ENGINES if e.name in self.info.backends)

    def validate(self, call: AttentionCall) -> None:
        self.check_options(call)

    def prepare(self, call: AttentionCall) -> Selection:
        return self.select(call)

    def build_pattern(self, call: AttentionCall) -> Pattern:
        return self.select(call).pattern

    def oracle_inputs(self, call: AttentionCall):
        sel = self.select(call)
        return sel.mask(), sel.bias()

    def selection(self, call: AttentionCall, pattern: Pattern, **fields) -> Selection:
        """A Selection of ``pattern`` for ``call`` (``fields``: run_pattern, order, details,
        score_mod, mod_tensors)."""
        return Selection(self.info.name, pattern, call.batch, call.heads, call.q_len, call.k_len,
                         call.is_causal, call.options.get("block_size") or DEFAULT_BLOCK, call.device, **fields)
