"""HaloNet blocked local attention with halos (Vaswani et al. 2021, arXiv 2103.12731).

The grid (an image ``(H, W)``; 1-D and 3-D work the same way) is cut into non-overlapping blocks of
``block`` cells per dimension; every query of a block attends to the same key window: its block
grown by ``halo`` cells on each side, cut at the grid's border. Along a dimension, query ``x`` sees
key ``y`` iff ``(x // block) * block - halo <= y < (x // block + 1) * block + halo``; the N-D mask is
the AND over dimensions. Tokens are the grid's cells in row-major order.

Padding. HaloNet implementations zero-pad the keys/values outside the image and do *not* mask
them (timm ``HaloAttn``: ``F.pad`` then ``unfold(win_size, block_size)``; the padded slots get
logit 0 plus a relative-position logit): that is not a masked softmax over the real tokens. This
pattern is the exact variant (spec ``mask_padding=True``): slots outside the grid are masked.
HaloNet's learned relative-position logits are a layer parameter, not part of the pattern.

Confirmed in huggingface/pytorch-image-models ``timm/layers/halo_attn.py`` (``HaloAttn``: window
``block_size + 2 * halo_size`` unfolded with step ``block_size`` over the map padded by
``halo_size``; defaults ``block_size=8, halo_size=3``; ``H % block_size == 0`` and
``W % block_size == 0`` required). No official code from the authors exists.
"""

from __future__ import annotations

import torch

from ..errors import OptionError
from .grid import GridPattern, _fmt, per_dim


class Halo(GridPattern):
    """HaloNet mask over ``grid`` with ``block`` and ``halo`` per dimension (see module doc)."""

    name = "halo"

    def __init__(self, grid, block=8, halo=3):
        super().__init__(grid)
        self.block = per_dim(block, self.rank, "block", owner=self.name)
        self.halo = per_dim(halo, self.rank, "halo", low=0, owner=self.name)
        for i, (n, b) in enumerate(zip(self.grid, self.block)):
            if n % b:
                divisors = [v for v in range(1, n + 1) if n % v == 0]
                raise OptionError(
                    f"halo: grid size {n} along dimension {i} is not a multiple of block={b} "
                    f"(grid={self.grid}); HaloNet tiles the map with whole blocks. Use a block in {divisors}.")

    def settings(self, q_len, k_len):
        return {**super().settings(q_len, k_len), "block": torch.tensor(self.block),
                "halo": torch.tensor(self.halo)}

    def axis_bounds(self, term, d, u, n, p):
        b, h = p["block"][d], p["halo"][d]
        start = (u // b) * b
        return start - h, start + b - 1 + h

    def describe(self):
        return f"halo({self._grid_text()}, block={_fmt(self.block)}, halo={_fmt(self.halo)})"


def halo(grid, block=8, halo=3) -> Halo:
    """HaloNet attention over ``grid`` (tokens row-major): query blocks of ``block`` cells per
    dimension see their block grown by ``halo`` cells, cut at the border (timm defaults 8 and 3)."""
    return Halo(grid, block, halo)


__all__ = ["Halo", "halo"]
