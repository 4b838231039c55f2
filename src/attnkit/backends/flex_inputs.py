"""What the flex kernel takes: a pattern's parameters as tensors, and its block mask built
from the analytic block plan (never from ``create_block_mask`` over ``Lq x Lk``).

- ``family_key`` names a pattern family (its class tree): configurations of one family share a
  compiled kernel. ``static_key`` is what that kernel is specialized on (the structure of
  ``params`` and its bools / strings), ``value_key`` every value (for caches).
- ``probe_rule`` checks, eagerly and in microseconds, that a rule takes every number of its
  ``params`` as a tensor (no Python branching on them).
- ``FlexBlocks`` holds FlexAttention's eight block-mask tensors for a plan: partial tiles
  (``mask_mod`` evaluated), full tiles (skipped) and the transposed lists of the backward pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..patterns.base import Pattern
from ..patterns.plan import EMPTY, FULL, PARTIAL


# -- pattern parameters as kernel inputs -----------------------------------------------------
def family_key(pattern: Pattern) -> tuple:
    """The pattern's class tree: its class and, by attribute name, its sub-patterns."""
    children = []
    for name, value in sorted(vars(pattern).items()):
        if isinstance(value, Pattern):
            children.append((name, family_key(value)))
        elif isinstance(value, (list, tuple)) and value and all(isinstance(x, Pattern) for x in value):
            children.append((name, tuple(family_key(x) for x in value)))
    cls = type(pattern)
    return (f"{cls.__module__}.{cls.__qualname__}", tuple(children))


def leaves(p: Any, path: tuple = ()) -> list[tuple[tuple, Any]]:
    """``(path, value)`` for every leaf of nested dicts / lists / tuples, in order."""
    out: list = []
    _collect(p, path, out)
    return out


def _collect(p: Any, path: tuple, out: list) -> None:
    if isinstance(p, dict):
        for key, x in p.items():
            _collect(x, path + (key,), out)
    elif isinstance(p, (list, tuple)):
        for i, x in enumerate(p):
            _collect(x, path + (i,), out)
    else:
        out.append((path, p))


def map_leaves(p: Any, fn, path: tuple = ()):
    if isinstance(p, dict):
        return {key: map_leaves(v, fn, path + (key,)) for key, v in p.items()}
    if isinstance(p, (list, tuple)):
        return type(p)(map_leaves(x, fn, path + (i,)) for i, x in enumerate(p))
    return fn(path, p)


def is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def as_tensor(x: Any, device, float_dtype: torch.dtype | None = None) -> Any:
    """Numbers as 0-d tensors (int64; floats in ``float_dtype`` or the default float dtype, the
    dtype a Python float takes in torch arithmetic); tensors moved; anything else unchanged."""
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, bool) or not is_number(x):
        return x
    dtype = torch.int64 if isinstance(x, int) else (float_dtype or torch.get_default_dtype())
    return torch.tensor(x, dtype=dtype, device=device)


def static_key(flat: list) -> tuple:
    """What a compiled kernel is specialized on, from ``leaves(p)``: the structure of ``p``, its
    bools / strings / None, and the kind (not the value) of its numbers and tensors."""
    out = []
    for path, x in flat:
        if isinstance(x, torch.Tensor):
            out.append((path, "tensor", x.dtype, x.dim()))
        elif is_number(x):
            out.append((path, type(x).__name__))
        elif isinstance(x, (bool, str, type(None))):
            out.append((path, x))
        else:
            out.append((path, type(x).__qualname__, repr(x)))
    return tuple(out)


def value_key(flat: list) -> tuple:
    """Every value of ``leaves(p)`` (tensors by identity and version), for the caches."""
    out = []
    for path, x in flat:
        if isinstance(x, torch.Tensor):
            out.append((path, id(x), x._version, tuple(x.shape), x.dtype, str(x.device)))
        else:
            out.append((path, repr(x)))
    return tuple(out)


def probe_rule(pattern: Pattern, p: dict, q_len: int, k_len: int) -> str | None:
    """None when ``pattern.rule`` accepts every number of ``p`` as a tensor, else why not.

    Each number is batched under ``torch.func.vmap``: a rule that branches on it in Python,
    converts it with ``int()`` / ``range()``, or uses it as a shape fails here, eagerly and in
    microseconds, instead of inside the compiler."""
    b = torch.zeros(1, 1, 1, 1, dtype=torch.long)
    h = torch.zeros(1, 1, 1, 1, dtype=torch.long)
    q = torch.arange(min(q_len, 4)).view(1, 1, -1, 1)
    k = torch.arange(min(k_len, 4)).view(1, 1, 1, -1)
    base = map_leaves(p, lambda path, x: as_tensor(x, "cpu") if not is_number(x) else x)
    for path, x in leaves(p):
        if not is_number(x):
            continue
        batched = torch.stack([as_tensor(x, "cpu")] * 2)

        def rule_at(value, path=path):
            params = map_leaves(base, lambda pp, y: value if pp == path else as_tensor(y, "cpu"))
            return pattern.rule(b, h, q, k, params)

        try:
            torch.func.vmap(rule_at)(batched)
        except Exception as err:  # noqa: BLE001 - any failure means: not tensor-safe
            where = "".join(f"[{key!r}]" for key in path)
            return (f"pattern {pattern.describe()}: its rule cannot take p{where}={x!r} as a tensor "
                    f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); flex passes "
                    "numbers as tensors so one kernel serves every configuration. Fix the rule to use "
                    "tensor ops (torch.where, clamp) on p values, or use backend='blocksparse'")
    return None


# -- block masks from block plans ------------------------------------------------------------
@dataclass(frozen=True)
class FlexBlocks:
    """FlexAttention's block-mask tensors for one plan, all int32 and contiguous:
    ``kv_num / kv_idx`` (partial tiles per query block, shape ``(Bp, Hp, nQ)`` / ``(Bp, Hp, nQ, nK)``),
    ``full_kv_*`` (full tiles), ``q_num / q_idx`` and ``full_q_*`` (the transposed lists), over
    query blocks of ``block`` and key blocks of ``block_k`` tokens."""

    kv_num: torch.Tensor
    kv_idx: torch.Tensor
    full_kv_num: torch.Tensor
    full_kv_idx: torch.Tensor
    q_num: torch.Tensor
    q_idx: torch.Tensor
    full_q_num: torch.Tensor
    full_q_idx: torch.Tensor
    block: int
    block_k: int
    row_tiles: float  # tiles computed per query block, averaged (kernel defaults depend on it)

    @property
    def shapes(self) -> tuple:
        return tuple(tuple(t.shape) for t in self.tensors())

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.kv_num, self.kv_idx, self.full_kv_num, self.full_kv_idx,
                self.q_num, self.q_idx, self.full_q_num, self.full_q_idx)

    @property
    def row_keys(self) -> float:
        """Keys computed per query block, averaged (tiles x key block)."""
        return self.row_tiles * self.block_k

    @property
    def tile_density(self) -> float:
        """Fraction of tiles computed (partial or full), over ``Bp x Hp x nQ x nK``."""
        return self.row_tiles / max(1, self.kv_idx.shape[-1])


def _ordered(present: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the count and the ascending column indices of the True entries (padded with
    the indices of the False ones, which the kernel never reads)."""
    count = present.sum(-1, dtype=torch.int32)
    index = torch.argsort((~present).to(torch.int8), dim=-1, stable=True).to(torch.int32)
    return count.contiguous(), index.contiguous()


def blocks_from_states(states: torch.Tensor, block: int | tuple[int, int],
                       demote_full: bool = False) -> FlexBlocks:
    """Tile states ``(Bp, Hp, nQ, nK)`` (0 empty, 1 partial, 2 full) as FlexAttention lists over
    blocks ``block`` or ``(block_q, block_k)``. ``demote_full`` treats full tiles as partial (the
    call's bool attn_mask still applies there)."""
    block_q, block_k = (block, block) if isinstance(block, int) else block
    partial = (states > EMPTY) if demote_full else (states == PARTIAL)
    full = torch.zeros_like(partial) if demote_full else (states == FULL)
    kv_num, kv_idx = _ordered(partial)
    fkv_num, fkv_idx = _ordered(full)
    q_num, q_idx = _ordered(partial.transpose(-1, -2))
    fq_num, fq_idx = _ordered(full.transpose(-1, -2))
    row_tiles = (int(kv_num.sum()) + int(fkv_num.sum())) / max(1, kv_num.numel())
    return FlexBlocks(kv_num, kv_idx, fkv_num, fkv_idx, q_num, q_idx, fq_num, fq_idx, block_q, block_k, row_tiles)


def build_blocks(pattern: Pattern, q_len: int, k_len: int, block: int | tuple[int, int], device,
                 demote_full: bool = False) -> FlexBlocks:
    """The block mask of ``pattern`` at these lengths, from its (analytic) block plan."""
    plan = pattern.block_plan(q_len, k_len, block, device)
    return blocks_from_states(plan.states.to(device), block, demote_full)
