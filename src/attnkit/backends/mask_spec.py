"""What the mask engines (dense, blocksparse, flex) execute: a Pattern, optionally with a
score modification, and the call's own ``attn_mask``. Engines know nothing about methods."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..patterns.base import Pattern

DEFAULT_BLOCK = 128  # the mask engines' tile where the call names no block_size

# score_mod(scores, b, h, q, k, *tensors) -> scores, vectorized; tensors may require grad
ScoreModFn = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class MaskSpec:
    pattern: Pattern
    score_mod: ScoreModFn | None = None
    mod_tensors: tuple[torch.Tensor, ...] = ()
    block: int = DEFAULT_BLOCK
    block_fixed: bool = False  # the user chose ``block``; otherwise an engine may pick its own

    def describe(self) -> str:
        mod = " + score_mod" if self.score_mod is not None else ""
        return self.pattern.describe() + mod
