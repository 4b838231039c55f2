"""Option helpers shared by the grid and video pattern methods (not a method module)."""

from __future__ import annotations

from math import prod

from ...errors import OptionError
from ...options import Option
from ...patterns.grid import check_grid

GRID = Option("grid", "ints", None, "token layout, e.g. (H, W) or (T, H, W); tokens are its cells in "
              "row-major order (last dimension fastest), so prod(grid) must equal L", low=1, nullable=True)


def resolve_grid(method: str, grid, length: int, default_1d: bool = True) -> tuple[int, ...]:
    """The call's grid: ``grid`` checked against ``L`` (OptionError), or ``(L,)`` when omitted."""
    if grid is None:
        if default_1d:
            return (length,)
        raise OptionError(f"method {method!r} needs grid=(T, H, W) or (T, S) (frames first) for its L={length} tokens.")
    dims = check_grid(grid)
    if prod(dims) != length:
        raise OptionError(
            f"method {method!r}: grid={dims} has {prod(dims)} cells but the sequence has L={length} tokens; "
            f"tokens are the grid's cells in row-major order, so prod(grid) must equal L. "
            f"Factor L, e.g. grid={suggest_grid(length, len(dims))}.")
    return dims


def resolve_frames(method: str, frames, tokens_per_frame, video: int) -> tuple[int, int]:
    """(frames, tokens_per_frame) for ``video`` tokens from whichever of the two is given."""
    if frames is None and tokens_per_frame is None:
        raise OptionError(f"method {method!r} needs frames=F or tokens_per_frame=S (F * S = {video} video tokens).")
    if frames is not None and tokens_per_frame is not None:
        if frames * tokens_per_frame != video:
            raise OptionError(
                f"method {method!r}: frames * tokens_per_frame = {frames} * {tokens_per_frame} = "
                f"{frames * tokens_per_frame} but there are {video} video tokens; pass only one of them "
                "or make them multiply to the video length.")
        return frames, tokens_per_frame
    given, name = (frames, "frames") if frames is not None else (tokens_per_frame, "tokens_per_frame")
    if video <= 0 or video % given:
        raise OptionError(
            f"method {method!r}: {name}={given} does not divide the {video} video tokens; choose one of "
            f"{divisors(video) if video > 0 else []}.")
    other = video // given
    return (given, other) if name == "frames" else (other, given)


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def suggest_grid(length: int, rank: int) -> tuple[int, ...]:
    """A near-square factorization of ``length`` into ``rank`` dimensions (for error messages)."""
    dims = []
    rest = length
    for r in range(rank, 1, -1):
        target = round(rest ** (1 / r))
        d = min(divisors(rest), key=lambda x: abs(x - target))
        dims.append(d)
        rest //= d
    return tuple(dims + [rest])


def random_grid(rng, length: int, max_rank: int = 3, min_rank: int = 1) -> tuple[int, ...]:
    """A random factorization of ``length`` into ``min_rank..max_rank`` dimensions."""
    rank = int(rng.integers(min_rank, max_rank + 1))
    dims = []
    rest = length
    for _ in range(rank - 1):
        d = int(rng.choice(divisors(rest)))
        dims.append(d)
        rest //= d
    dims.append(rest)
    return tuple(int(x) for x in rng.permutation(dims)) if rank > 1 else tuple(dims)


def sample_block_size(rng, length: int) -> int:
    """Engine tile sizes for property tests: small ones give several tiles (full, partial, empty)
    at the short lengths the tests use, and cheap ones."""
    return int(rng.choice([16, 32] if length <= 64 else [16, 32, 128]))


def bench_grid(length: int, rank: int) -> tuple[int, ...]:
    """The benchmark's layout for ``length`` tokens: near-square, frames first for rank 3
    (OptionError when ``length`` has no such factorization with every side >= 2)."""
    dims = suggest_grid(length, rank)
    if rank > 1 and min(dims) < 2:
        raise OptionError(f"L={length} has no {rank}-D layout with every side >= 2 for the benchmark.")
    return dims


def odd_kernel(area: float, rank: int, limit: tuple[int, ...]) -> tuple[int, ...]:
    """Odd per-dimension kernel sizes whose product is close to ``area`` (capped by the grid)."""
    side = max(1.0, area ** (1 / rank))
    k = max(1, int(round(side)) | 1)
    return tuple(min(k, n if n % 2 else n - 1) or 1 for n in limit)
