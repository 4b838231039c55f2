"""Methods that are a Pattern: their options build a Pattern, and the shared mask engines
(flex, blocksparse, dense; auto takes flex on GPU, blocksparse on CPU) execute it. The oracle with the pattern's dense mask is their
reference, so every pattern method is exact by construction and tested that way."""

from __future__ import annotations

from typing import Any

import torch

from ..backends.blocksparse import BlockSparseEngine
from ..backends.dense import DenseEngine, combined_mask
from ..backends.flex import FlexEngine
from ..backends.mask_spec import DEFAULT_BLOCK, MaskSpec
from ..call import AttentionCall
from ..errors import OptionError
from ..options import Option
from ..patterns.base import Pattern
from ..patterns.order import TokenOrder
from ..reference import reference
from ..registry import Method

MASK_ENGINES = (FlexEngine(), BlockSparseEngine(), DenseEngine())
MASK_BACKENDS = tuple(e.name for e in MASK_ENGINES)

TOKEN_ORDER = Option("token_order", "choice", "call", "order of the tokens of q, k, v and of the output: 'call' = "
                     "the grid's cells in row-major order (the mask engines move them into a tiled order and "
                     "back on every call); 'tiled' = already in that tiled order (ak.token_order(...).order), "
                     "so nothing moves: permute once before a stack of layers, once after",
                     choices=("call", "tiled"))
BLOCK_SIZE = Option("block_size", "int", None, "tile size of the blocksparse / flex engines; None = "
                    "the engine's choice (flex: 128; blocksparse: the size that computes the fewest "
                    "scores for this pattern; a performance knob: results do not depend on it)",
                    low=16, high=1024, nullable=True, tuning=True)


class PatternMethod(Method):
    """Subclasses implement ``build_pattern(call)`` (options are in ``call.options``)."""

    def build_pattern(self, call: AttentionCall) -> Pattern:
        raise NotImplementedError

    def score_mod(self, call: AttentionCall):
        """Optional ``(fn, tensors)`` score modification (e.g. a relative-position bias)."""
        return None, ()

    def engines(self):
        return MASK_ENGINES

    def validate(self, call: AttentionCall) -> None:
        self.pattern_in_order(call).check(call.q_len, call.k_len)

    def tiled_order(self, call: AttentionCall, pattern: Pattern | None = None) -> TokenOrder:
        """The tiled token order the mask engines would move this call's tokens into (grid patterns;
        :mod:`attnkit.patterns.grid_order`), or OptionError when there is none."""
        pattern = pattern or self.build_pattern(call)
        block = call.options.get("block_size") or DEFAULT_BLOCK
        order = pattern.token_order(call.q_len, call.k_len, block)
        if order is None:
            raise OptionError(
                f"token_order='tiled': {pattern.describe()} has no tiled order at L={call.q_len} that computes "
                f"fewer {block}x{block} tiles than row-major order (or the call is not self-attention over the "
                "whole grid); pass the tokens in the grid's row-major order with token_order='call'.")
        return order

    def pattern_in_order(self, call: AttentionCall) -> Pattern:
        """The pattern over the tokens as given: the grid's cells in row-major order, or with
        ``token_order='tiled'`` in the tiled order (``ak.token_order``), where no engine moves them."""
        pattern = self.build_pattern(call)
        if call.options.get("token_order", "call") == "tiled":
            return self.tiled_order(call, pattern).pattern
        return pattern

    def prepare(self, call: AttentionCall) -> MaskSpec:
        pattern = self.pattern_in_order(call)
        pattern.check(call.q_len, call.k_len)
        pattern.check_heads(call.batch, call.heads)
        fn, tensors = self.score_mod(call)
        chosen = call.options.get("block_size")
        return MaskSpec(pattern, fn, tuple(tensors), chosen or DEFAULT_BLOCK, block_fixed=chosen is not None)

    def oracle_inputs(self, call: AttentionCall) -> tuple[Any, Any]:
        spec = self.prepare(call)
        keep, bias = combined_mask(call, spec)
        if spec.score_mod is not None:
            bias = _bias_of(call, spec) if bias is None else bias + _bias_of(call, spec)
        return keep, bias

    def reference(self, call: AttentionCall) -> torch.Tensor:
        mask, bias = self.oracle_inputs(call)
        return reference(call.query, call.key, call.value, mask=mask, bias=bias,
                         scale=call.scale).to(call.dtype)


def _bias_of(call: AttentionCall, spec: MaskSpec) -> torch.Tensor:
    """An additive score_mod as a dense bias (score_mod(0) - 0); tests and the oracle only."""
    B, H, Lq, Lk = call.batch, call.heads, call.q_len, call.k_len
    dev = call.device
    zero = torch.zeros(B, H, Lq, Lk, dtype=torch.float64, device=dev)
    b = torch.arange(B, device=dev).view(-1, 1, 1, 1)
    h = torch.arange(H, device=dev).view(1, -1, 1, 1)
    q = torch.arange(Lq, device=dev).view(1, 1, -1, 1)
    k = torch.arange(Lk, device=dev).view(1, 1, 1, -1)
    return spec.score_mod(zero, b, h, q, k, *[t.to(torch.float64) for t in spec.mod_tensors])


class GivenPattern(PatternMethod):
    """``ak.attend(q, k, v, pattern=p)``: a user's Pattern object (ANDed with the causal mask
    when ``is_causal``). Not registered; built per call."""

    def __init__(self, pattern: Pattern):
        from ..call import ALL_PATTERNS
        from ..registry import MethodInfo, options

        self.pattern = pattern
        self.info = MethodInfo(name="pattern", family="P", kind="exact", patterns=ALL_PATTERNS,
                               summary=f"user pattern {pattern.describe()}", backends=MASK_BACKENDS,
                               accepts_mask=True, decode=True, options=options(BLOCK_SIZE))

    def build_pattern(self, call):
        if call.is_causal:
            from ..patterns.interval import Full

            return self.pattern & Full(causal=True)
        return self.pattern
