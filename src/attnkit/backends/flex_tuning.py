"""Performance settings of the flex engine (none changes results beyond dtype tolerance).

- ``kernel_options``: FlexAttention's Triton knobs (``torch.nn.attention.flex_attention.
  FlexKernelOptions``): tile sizes ``BLOCK_M`` / ``BLOCK_N`` (forward; ``fwd_`` / ``bwd_``
  prefixes and ``BLOCK_M1`` ... ``BLOCK_N2`` for the backward pass), ``num_warps``,
  ``num_stages``, ``PRESCALE_QK`` (q scaled before the product: different bf16 rounding),
  ``USE_TMA``, ``WRITE_DQ``, ``ROWS_GUARANTEED_SAFE`` (skips the empty-row guard; the engine
  accepts it only where it proves every row sees a key). Refused: ``BLOCKS_ARE_CONTIGUOUS``
  (wrong results unless each row's partial and full tiles are runs of consecutive blocks, which
  attnkit's plans do not promise), ``BACKEND`` (another kernel), the internal ``OUTPUT_*``.
  Each distinct set of options is its own compiled kernel.
- ``kv_block``: key-side block of the block mask (``None``: the same as the query block). 64 with
  the default 128 query block lets the plan skip half-empty key tiles; FlexAttention needs the
  kernel's ``BLOCK_N`` to divide it (the H100 forward default is 64) and its backward pass's
  default tiles (``BLOCK_N1 = 128`` on sm90) do not divide 64, so the engine refuses it where
  gradients are needed on CUDA.
- ``token_tiling``: run patterns that offer a token order (grid patterns) in it.

``default_kernel_options`` is where measured defaults go (empty: torch's own heuristics).
"""

from __future__ import annotations

from typing import Any

from ..errors import OptionError, did_you_mean

_BLOCKS = ("BLOCK_M", "BLOCK_N", "BLOCK_M1", "BLOCK_N1", "BLOCK_M2", "BLOCK_N2")
_INTS = ("num_warps", "num_stages")
_FLAGS = ("PRESCALE_QK", "ROWS_GUARANTEED_SAFE", "WRITE_DQ", "USE_TMA", "FORCE_USE_FLEX_ATTENTION")
REFUSED = {
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


def default_kernel_options(device_type: str, dtype, head_dim: int) -> dict[str, Any]:
    """attnkit's defaults where the engine sets none (empty: FlexAttention's own heuristics).
    Set from ``scripts/gpu/bench_patterns.py --sweep`` measurements."""
    return {}


__all__ = ["REFUSED", "check_kernel_options", "check_kv_block", "default_kernel_options"]
