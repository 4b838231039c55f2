"""``halo``: HaloNet blocked local attention with halos (exact: padding outside the grid masked).

Query blocks of ``block`` cells per dimension attend to their block grown by ``halo`` cells on each
side, cut at the border. ``grid`` is the token layout (row-major; default ``(L,)``; an image is
``(H, W)``), every size a multiple of ``block``. Non-causal self-attention only. Details and what
was confirmed (timm ``HaloAttn``): :mod:`attnkit.patterns.halo`.
"""

from __future__ import annotations

from ...call import pattern_name
from ...options import Option
from ...patterns.halo import Halo
from ...registry import MethodInfo, options, register
from ..pattern_method import BLOCK_SIZE, MASK_BACKENDS, TOKEN_ORDER, PatternMethod
from ._grid import GRID, divisors, random_grid, resolve_grid, sample_block_size
from ._grid import bench_grid


@register
class HaloMethod(PatternMethod):
    info = MethodInfo(
        name="halo", family="P", kind="exact", patterns=frozenset({pattern_name(False, True)}), seed=(19,),
        summary="HaloNet: blocks of a grid attend to their block plus a halo (padding masked)",
        backends=MASK_BACKENDS, accepts_mask=True,
        options=options(
            GRID,
            Option("block", "ints", 8, "query block size per dimension (divides the grid; timm default 8)", low=1),
            Option("halo", "ints", 3, "halo width per dimension around each block (timm default 3)", low=0),
            TOKEN_ORDER, BLOCK_SIZE),
        references="Vaswani et al. 2021 (HaloNet, arXiv 2103.12731); timm HaloAttn")

    def build_pattern(self, call):
        o = call.options
        return Halo(resolve_grid("halo", o["grid"], call.q_len), o["block"], o["halo"])

    def bench_options(self, q_len, k_len, density=None):
        """A 2-D layout with HaloNet's defaults (block 8, halo 3) where the grid allows."""
        if density is not None:
            return super().bench_options(q_len, k_len, density)
        grid = bench_grid(q_len, 2)
        block = next((b for b in (8, 4, 2, 1) if all(n % b == 0 for n in grid)), 1)
        return {"grid": grid, "block": block, "halo": min(3, block)}

    def sample_options(self, rng, q_len, k_len):
        grid = random_grid(rng, q_len)
        block = tuple(int(rng.choice(divisors(n))) for n in grid)
        halo = tuple(int(rng.integers(0, 4)) for _ in grid)
        return {"grid": grid, "block": block, "halo": halo, "block_size": sample_block_size(rng, q_len)}
