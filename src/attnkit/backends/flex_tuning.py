"""Performance settings of the flex engine (none changes results beyond dtype tolerance).

- ``kernel_options``: FlexAttention's Triton knobs (``torch.nn.attention.flex_attention.
  FlexKernelOptions``): tile sizes ``BLOCK_M`` / ``BLOCK_N`` (forward; ``fwd_`` / ``bwd_``
  prefixes and ``BLOCK_M1`` ... ``BLOCK_N2`` for the backward pass), ``num_warps``,
  ``num_stages``, ``PRESCALE_QK`` (q scaled before the product: different bf16 rounding),
  ``USE_TMA``, ``WRITE_DQ``. Refused: ``ROWS_GUARANTEED_SAFE`` (NaN outputs measured where every
  row does see a key), ``BLOCKS_ARE_CONTIGUOUS``
  (wrong results unless each row's partial and full tiles are runs of consecutive blocks, which
  attnkit's plans do not promise), ``BACKEND`` (another kernel), the internal ``OUTPUT_*``.
  Each distinct set of options is its own compiled kernel.
- ``kv_block``: key-side block of the block mask (``None``: the same as the query block). 64 with
  the default 128 query block lets the plan skip half-empty key tiles; FlexAttention needs the
  kernel's ``BLOCK_N`` to divide it (the H100 forward default is 64) and its backward pass's
  default tiles (``BLOCK_N1 = 128`` on sm90) do not divide 64, so the engine refuses it where
  gradients are needed on CUDA.
  Default (``None``): 64 for forward-only CUDA calls of patterns run in a tiled token order with
  the 128 query block (``default_kv_block``), else the query block; and where the call names no
  ``block_size``, query and key blocks of 64 for narrow forward-only plans (``default_blocks``).
- ``token_tiling``: run patterns that offer a token order (grid patterns) in it.

``default_kernel_options``, ``default_kv_block`` and ``default_blocks``: the measured defaults
(64-row forward tiles for narrow plans; 64-key blocks for forward-only tiled grid calls; 64-token
query and key blocks for narrow forward-only plans where the call names no ``block_size``).
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import OptionError, did_you_mean

_BLOCKS = ("BLOCK_M", "BLOCK_N", "BLOCK_M1", "BLOCK_N1", "BLOCK_M2", "BLOCK_N2")
_INTS = ("num_warps", "num_stages")
_FLAGS = ("PRESCALE_QK", "WRITE_DQ", "USE_TMA", "FORCE_USE_FLEX_ATTENTION")
REFUSED = {
    "ROWS_GUARANTEED_SAFE": "on an H200 (torch 2.11, Triton 3.6) it gave NaN in half of the outputs of a "
                            "+-256 sliding window, where every query row sees keys (scripts/gpu/bench_patterns.py "
                            "--sweep, setting rows_safe); drop it",
    "BLOCKS_ARE_CONTIGUOUS": "it gives wrong results unless every row's partial and full tiles are runs of "
                             "consecutive blocks, which attnkit's block plans do not promise",
    "BACKEND": "it selects another kernel; the flex engine runs FlexAttention's Triton kernel",
    "OUTPUT_LOGSUMEXP": "it is set by FlexAttention itself",
    "OUTPUT_MAX": "it is set by FlexAttention itself",
}


def _names() -> list[str]:
    base = [*_BLOCKS, *_INTS, *_FLAGS]
    return base + [f"{p}_{n}" for p in ("fwd", "bwd") for n in base]


def check_kernel_options(options: dict[str, Any] | None) -> tuple[tuple[str, Any], ...]:
    """The options as sorted ``(name, value)`` pairs (a kernel variant's key), or OptionError."""
    if options is None:
        return ()
    if not isinstance(options, dict):
        raise OptionError(f"flex kernel_options={options!r} must be a dict such as {{'BLOCK_N': 128}} or None.")
    out = []
    for name, value in options.items():
        bare = name.split("_", 1)[1] if name.startswith(("fwd_", "bwd_")) else name
        if bare in REFUSED:
            raise OptionError(f"flex kernel_options: {name}={value!r} is not accepted: {REFUSED[bare]}.")
        if name not in _names():
            raise OptionError(f"flex kernel_options: unknown option {name!r}.{did_you_mean(name, _names())} "
                              f"Accepted: {', '.join([*_BLOCKS, *_INTS, *_FLAGS])}, each also with a fwd_ / bwd_ prefix.")
        if bare in _FLAGS:
            if not isinstance(value, bool):
                raise OptionError(f"flex kernel_options: {name}={value!r} must be True or False.")
        elif isinstance(value, bool) or not isinstance(value, int) or value < 1 or (
                bare in _BLOCKS and value & (value - 1)):
            what = "a power of two (16, 32, 64, 128)" if bare in _BLOCKS else "a positive int"
            raise OptionError(f"flex kernel_options: {name}={value!r} must be {what}.")
        out.append((name, value))
    return tuple(sorted(out))


def check_kv_block(kv_block: int | None) -> int | None:
    if kv_block is None:
        return None
    if isinstance(kv_block, bool) or not isinstance(kv_block, int) or kv_block < 16 or kv_block & (kv_block - 1):
        raise OptionError(f"flex kv_block={kv_block!r} must be None (the query block) or a power of two >= 16, "
                          "e.g. 64.")
    return kv_block


# Forward tiles for narrow plans, from scripts/gpu/bench_patterns.py --sweep on an H200 (torch 2.11,
# Triton 3.6, bf16, B1 H16 L32768 D128, same run as cuDNN): a +-256 window (640 keys per query
# block) went 0.574 -> 0.519 ms forward (2.17 -> 2.11 ms forward+backward); wider plans did not gain
# (window +-1024, 17 tiles: 1.46 -> 1.48 ms; 2-D neighbourhood, 8.3 tiles: 2.05 -> 2.26 ms).
NARROW_ROW_KEYS = 768  # 6 key blocks of 128
NARROW_FORWARD = {"fwd_BLOCK_M": 64, "fwd_BLOCK_N": 64, "fwd_num_warps": 4, "fwd_num_stages": 3}
# the largest forward tile of FlexAttention's heuristics (torch 2.6-2.13); blocks below it get tiles
# of their own size
FLEX_TILE_CAP = 128


# Key blocks of 64 for tiled grid layouts, forward only (the sm90 backward's tiles need 128), from the
# same sweep: the tiled plan computes 32 % fewer tile area (2-D 16x8: 1,440 vs 2,112 tiles of
# 128 x 128; 3-D 2x8x8: 3,388 vs 4,840) and the forward went 2.05 -> 1.71 ms (2-D neighbourhood
# 128x256, 17x17) and 3.79 -> 2.89 ms (3-D 8x64x64, 3x15x15), both with the gathers of then.
TILED_KV_BLOCK = 64


def default_kv_block(device_type: str, block: int, tiled: bool, needs_grad: bool) -> int | None:
    """attnkit's key block where none is set: ``TILED_KV_BLOCK`` for a forward-only CUDA call of a
    pattern run in a tiled token order (``tiled``) with the 128 query block; else None (the query
    block)."""
    if device_type == "cuda" and tiled and not needs_grad and block == 128:
        return TILED_KV_BLOCK
    return None


# Query and key blocks of 64 for narrow forward-only plans, from the same kind of sweep (H200, torch
# 2.11, bf16, B1 H16 L32768 D128, 2026-11-27, ``bench_patterns.py --sweep --sweep-settings block64``):
# window +-256 0.508 -> 0.460 ms (a 64-query block computes 576 keys instead of 640) and the 2-D
# neighbourhood 1.33 -> 1.16 ms (8x8 token tiles); wider plans lost (window +-1024 1.47 -> 2.77 ms,
# 3-D neighbourhood 2.34 -> 3.70 ms), hence the same ``NARROW_ROW_KEYS`` bound, taken at the blocks the
# call would otherwise run.
NARROW_BLOCK = 64


def default_blocks(device_type: str, dtype, head_dim: int, needs_grad: bool,
                   row_keys: float) -> tuple[int, int] | None:
    """attnkit's block pair where the call names no ``block_size`` and the engine no ``kv_block``:
    ``(NARROW_BLOCK, NARROW_BLOCK)`` for forward-only CUDA calls in 16-bit at head dim 128 whose plan
    computes at most ``NARROW_ROW_KEYS`` keys per query block (``row_keys``, at the blocks it would
    otherwise run); None keeps those blocks."""
    if (device_type == "cuda" and not needs_grad and dtype in (torch.bfloat16, torch.float16)
            and head_dim == 128 and row_keys <= NARROW_ROW_KEYS):
        return NARROW_BLOCK, NARROW_BLOCK
    return None


def default_kernel_options(device_type: str, dtype, head_dim: int, row_keys: float,
                           blocks: tuple[int, int] = (128, 128)) -> dict[str, Any]:
    """attnkit's settings where the engine is given none: FlexAttention's own heuristics, except

    - 64-row forward tiles for plans of at most ``NARROW_ROW_KEYS`` keys per query block on CUDA in
      16-bit at head dim 128 (where it was measured, above);
    - on CUDA, forward tiles no larger than the block mask's blocks (``blocks``: query, key):
      FlexAttention's heuristic tiles (e.g. ``BLOCK_N = 128`` at head dim 64 in bf16 on sm90) must
      divide them, else it refuses to compile.

    ``row_keys``: keys computed per query block (tiles x key block), averaged."""
    if device_type != "cuda":
        return {}
    options = {}
    if dtype in (torch.bfloat16, torch.float16) and head_dim == 128 and row_keys <= NARROW_ROW_KEYS:
        options.update(NARROW_FORWARD)
    for name, block in zip(("fwd_BLOCK_M", "fwd_BLOCK_N"), blocks):
        if block < FLEX_TILE_CAP:
            options[name] = min(options.get(name, block), block)
    return options


__all__ = ["FLEX_TILE_CAP", "NARROW_BLOCK", "NARROW_FORWARD", "NARROW_ROW_KEYS", "REFUSED", "TILED_KV_BLOCK",
           "check_kernel_options", "check_kv_block", "default_blocks", "default_kernel_options", "default_kv_block"]
