"""The validated arguments of one attention call.

``AttentionCall.build`` checks the SDPA-style arguments at the boundary (rank, sizes, GQA,
dtype, device, mask, scale, dropout) so nothing downstream needs to re-check them, and no error
leaks from deep inside torch for an input we could have checked.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from .errors import ArgumentError, DeviceError, DtypeError, ShapeError

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
PATTERNS = ("noncausal-self", "causal-self", "noncausal-cross", "causal-cross")
SELF_PATTERNS = frozenset({"noncausal-self", "causal-self"})
CAUSAL_PATTERNS = frozenset({"causal-self", "causal-cross"})
ALL_PATTERNS = frozenset(PATTERNS)


def pattern_name(is_causal: bool, is_self: bool) -> str:
    """One of :data:`PATTERNS` (CAB's NS, CS, NC, CC)."""
    return ("causal" if is_causal else "noncausal") + ("-self" if is_self else "-cross")


@dataclass(frozen=True)
class AttentionCall:
    """Checked inputs of ``attend``: shapes ``q (B, H, Lq, D)``, ``k (B, Hkv, Lk, D)``,
    ``v (B, Hkv, Lk, Dv)``; ``attn_mask`` is None, or bool / float broadcastable to
    ``(B, H, Lq, Lk)`` (always 4-D here); ``scale`` is resolved to a float."""

    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    attn_mask: torch.Tensor | None = None
    dropout_p: float = 0.0
    is_causal: bool = False
    scale: float = 1.0
    enable_gqa: bool = False
    options: dict[str, Any] = field(default_factory=dict)

    # -- sizes ----------------------------------------------------------------------------
    @property
    def batch(self) -> int:
        return self.query.shape[0]

    @property
    def heads(self) -> int:
        return self.query.shape[1]

    @property
    def kv_heads(self) -> int:
        return self.key.shape[1]

    @property
    def group(self) -> int:
        """Query heads per kv head (1 without GQA)."""
        return self.heads // self.kv_heads

    @property
    def q_len(self) -> int:
        return self.query.shape[2]

    @property
    def k_len(self) -> int:
        return self.key.shape[2]

    @property
    def head_dim(self) -> int:
        return self.query.shape[3]

    @property
    def value_dim(self) -> int:
        return self.value.shape[3]

    @property
    def is_self(self) -> bool:
        """attnkit calls a call self-attention when Lq == Lk, cross-attention otherwise."""
        return self.q_len == self.k_len

    @property
    def pattern(self) -> str:
        return pattern_name(self.is_causal, self.is_self)

    @property
    def causal_offset(self) -> int:
        """Bottom-right alignment: query i sits at key position ``i + Lk - Lq``."""
        return self.k_len - self.q_len

    @property
    def device(self) -> torch.device:
        return self.query.device

    @property
    def dtype(self) -> torch.dtype:
        return self.query.dtype

    def with_options(self, options: dict[str, Any]) -> AttentionCall:
        return replace(self, options=options)

    def expanded_kv(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Key and value repeated to ``H`` heads (a copy only under GQA)."""
        if self.group == 1:
            return self.key, self.value
        return (self.key.repeat_interleave(self.group, dim=1),
                self.value.repeat_interleave(self.group, dim=1))

    # -- construction ---------------------------------------------------------------------
    @classmethod
    def build(cls, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
              scale=None, enable_gqa=False) -> AttentionCall:
        _check_tensor("query", query)
        _check_tensor("key", key)
        _check_tensor("value", value)
        B, H, Lq, D = query.shape
        Bk, Hk, Lk, Dk = key.shape
        Bv, Hv, Lv, Dv = value.shape
        if Bk != B or Bv != B:
            raise ShapeError(
                f"batch sizes differ: query has B={B}, key B={Bk}, value B={Bv}; the layout is "
                "(B, H, L, D) for all three — check for a transposed (B, L, H, D) tensor.")
        if Dk != D:
            raise ShapeError(
                f"key head dim {Dk} != query head dim {D} (last dimension); query and key must "
                "share D. Value may differ (Dv).")
        if Lv != Lk:
            raise ShapeError(
                f"value length {Lv} != key length {Lk} (dimension 2); every key needs a value.")
        if Hv != Hk:
            raise ShapeError(f"value has {Hv} heads but key has {Hk}; they must match.")
        if H != Hk:
            if H % Hk != 0:
                raise ShapeError(
                    f"query has H={H} heads and key Hkv={Hk}: grouped-query attention needs H to "
                    f"be a multiple of Hkv. Use Hkv in {_divisors(H)}.")
            if not enable_gqa:
                raise ShapeError(
                    f"query has H={H} heads but key/value have {Hk}: pass enable_gqa=True for "
                    "grouped-query attention (as in torch SDPA).")
        for name, t in (("key", key), ("value", value)):
            if t.dtype != query.dtype:
                raise DtypeError(
                    f"{name}.dtype is {t.dtype} but query.dtype is {query.dtype}; cast them to one "
                    f"dtype, e.g. {name}.to(query.dtype).")
            if t.device != query.device:
                raise DeviceError(
                    f"{name} is on {t.device} but query is on {query.device}; move them to one "
                    f"device, e.g. {name}.to(query.device).")
        if not isinstance(is_causal, bool):
            raise ArgumentError(f"is_causal must be True or False, got {is_causal!r}.")
        if not isinstance(enable_gqa, bool):
            raise ArgumentError(f"enable_gqa must be True or False, got {enable_gqa!r}.")
        if isinstance(dropout_p, bool) or not isinstance(dropout_p, numbers.Real) or not (
                0.0 <= float(dropout_p) < 1.0):
            raise ArgumentError(f"dropout_p={dropout_p!r} is invalid; it must be a float in [0, 1).")
        if scale is None:
            scale = 1.0 / math.sqrt(D)
        elif isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale):
            raise ArgumentError(
                f"scale={scale!r} is invalid; it must be a finite number (or None for 1/sqrt(D)).")
        mask = _check_mask(attn_mask, query, (B, H, Lq, Lk))
        return cls(query, key, value, mask, float(dropout_p), is_causal, float(scale), enable_gqa)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _check_tensor(name: str, t: Any) -> None:
    if not isinstance(t, torch.Tensor):
        raise DtypeError(f"{name} must be a torch.Tensor of shape (B, H, L, D), got {type(t).__name__}.")
    if t.dim() != 4:
        raise ShapeError(
            f"{name} has shape {tuple(t.shape)} (rank {t.dim()}); attnkit takes SDPA's layout "
            f"(B, H, L, D). For a 3-D (H, L, D) tensor use {name}.unsqueeze(0).")
    if t.dtype not in FLOAT_DTYPES:
        raise DtypeError(
            f"{name}.dtype is {t.dtype}; attention takes a floating dtype "
            "(float16, bfloat16, float32 or float64).")
    if any(s == 0 for s in t.shape):
        raise ShapeError(f"{name} has an empty dimension, shape {tuple(t.shape)}; every size must be >= 1.")


def _check_mask(mask: Any, query: torch.Tensor, full: tuple[int, int, int, int]) -> torch.Tensor | None:
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise DtypeError(f"attn_mask must be a torch.Tensor or None, got {type(mask).__name__}.")
    if mask.dtype != torch.bool and mask.dtype != query.dtype:
        raise DtypeError(
            f"attn_mask.dtype is {mask.dtype}; it must be torch.bool (True = attend) or the query's "
            f"dtype {query.dtype} (added to the scores). Fix: attn_mask.to(torch.bool) or "
            "attn_mask.to(query.dtype).")
    if mask.device != query.device:
        raise DeviceError(f"attn_mask is on {mask.device} but query is on {query.device}.")
    if mask.dim() > 4 or mask.dim() == 0:
        raise ShapeError(f"attn_mask has shape {tuple(mask.shape)}; it must broadcast to (B, H, Lq, Lk) = {full}.")
    shape = (1,) * (4 - mask.dim()) + tuple(mask.shape)
    for got, want, dim in zip(shape, full, "B H Lq Lk".split()):
        if got not in (1, want):
            raise ShapeError(
                f"attn_mask has shape {tuple(mask.shape)}, which does not broadcast to "
                f"(B, H, Lq, Lk) = {full}: its {dim} size is {got}, allowed 1 or {want}.")
    return mask.reshape(shape)
