"""``neighborhood``: NATTEN / Generalized Neighborhood Attention over a 1-D/2-D/3-D token grid.

``grid`` is the token layout (row-major, last dimension fastest; default ``(L,)``), ``kernel_size``,
``dilation`` and ``stride`` (GNA) are ints or one per dimension. Causality is per dimension:

- ``is_causal=True`` makes every dimension causal (the mask is then causal in token order);
- ``causal_dims=(True, False, False)`` with ``is_causal=False`` is causal in time only (video):
  a query sees later tokens of its own frame, so the call is non-causal in attnkit's sense;
- ``is_causal=True`` with a ``causal_dims`` that leaves a dimension non-causal, or
  ``is_causal=False`` with every dimension causal, contradict each other and raise OptionError.

The window arithmetic and what was confirmed in NATTEN's code: :mod:`attnkit.patterns.neighborhood`.
Self-attention only (NATTEN needs one layout for queries and keys).
"""

from __future__ import annotations

from ...call import SELF_PATTERNS
from ...errors import OptionError
from ...options import Option
from ...patterns.grid import per_dim_flags
from ...patterns.neighborhood import Neighborhood
from ...registry import MethodInfo, options, register
from ..pattern_method import BLOCK_SIZE, MASK_BACKENDS, TOKEN_ORDER, PatternMethod
from ._grid import GRID, random_grid, resolve_grid, sample_block_size
from ._grid import bench_grid, odd_kernel


@register
class NeighborhoodMethod(PatternMethod):
    info = MethodInfo(
        name="neighborhood", family="P", kind="exact", patterns=SELF_PATTERNS, seed=(22, 58),
        summary="neighborhood attention (NATTEN/GNA): per-dimension windows on a 1-3D grid, dilation, stride",
        backends=MASK_BACKENDS, accepts_mask=True,
        options=options(
            GRID,
            Option("kernel_size", "ints", None, "window size per dimension (int or tuple; required)", low=1,
                   nullable=True),
            Option("dilation", "ints", 1, "dilation per dimension (kernel_size * dilation <= grid size)", low=1),
            Option("stride", "ints", 1, "GNA stride per dimension: queries in a stride group share the "
                   "window of its leader (1 = sliding, kernel_size = blocked)", low=1),
            Option("causal_dims", "object", None, "per-dimension causal flags, e.g. (True, False, False) "
                   "for video; None = every dimension causal iff is_causal", nullable=True),
            TOKEN_ORDER, BLOCK_SIZE),
        references="Hassani et al. 2023 (NAT, arXiv 2204.07143); Hassani & Shi 2022 (DiNAT, 2209.15001); "
                   "Hassani et al. 2025 (GNA, 2504.16922); SHI-Labs/NATTEN")

    def build_pattern(self, call):
        o = call.options
        grid = resolve_grid("neighborhood", o["grid"], call.q_len)
        if o["kernel_size"] is None:
            raise OptionError("method 'neighborhood' needs kernel_size (an int or one per grid dimension), "
                              "e.g. kernel_size=7.")
        causal = causal_dims(o["causal_dims"], call.is_causal, len(grid))
        return Neighborhood(grid, o["kernel_size"], o["dilation"], o["stride"], causal)

    def bench_options(self, q_len, k_len, density=None):
        """A 2-D layout (near-square grid); kernel 7x7, or the kernel area that keeps ``density``."""
        grid = bench_grid(q_len, 2)
        area = 49 if density is None else density * q_len
        return {"grid": grid, "kernel_size": odd_kernel(area, 2, grid)}

    def sample_options(self, rng, q_len, k_len):
        grid = random_grid(rng, q_len)
        kernel, dilation, stride = [], [], []
        for n in grid:
            d = int(rng.integers(1, max(1, n // 2) + 1)) if rng.random() < 0.4 else 1
            k = int(rng.integers(min(2, n // d), n // d + 1))
            kernel.append(k)
            dilation.append(d)
            stride.append(int(rng.integers(1, k + 1)) if rng.random() < 0.5 else 1)
        return {"grid": grid, "kernel_size": tuple(kernel), "dilation": tuple(dilation), "stride": tuple(stride),
                "block_size": sample_block_size(rng, q_len)}


def causal_dims(given, is_causal: bool, rank: int) -> tuple[bool, ...]:
    """Per-dimension causal flags from ``causal_dims`` and the call's ``is_causal`` (module doc)."""
    if given is None:
        return (is_causal,) * rank
    dims = per_dim_flags(given, rank, "causal_dims", owner="method 'neighborhood'")
    if is_causal and not all(dims):
        raise OptionError(
            f"method 'neighborhood': is_causal=True means causal in token order, i.e. every grid dimension "
            f"causal, but causal_dims={given!r} leaves some dimension non-causal. For a mask causal in some "
            "dimensions only (video: causal_dims=(True, False, False)) pass is_causal=False; for every "
            "dimension causal, drop causal_dims.")
    if not is_causal and all(dims):
        raise OptionError(
            f"method 'neighborhood': causal_dims={given!r} makes every dimension causal, which is causal "
            "attention: pass is_causal=True (and drop causal_dims) so the call is declared causal.")
    return dims
