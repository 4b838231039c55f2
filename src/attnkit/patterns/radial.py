"""Radial Attention: a static energy-decay mask for video diffusion transformers (Li et al., NeurIPS
2025, arXiv 2506.19852; official mit-han-lab/radial-attention ``radial_attn/attn_mask.py``).

Tokens: ``frames x tokens_per_frame`` video tokens (frame after frame), then any number of text
tokens. The mask is defined on ``mask_block x mask_block`` tiles (the official block size, 128 or
64): token ``i`` sees token ``j`` iff tile ``(i // B, j // B)`` of the table below is on, so the
pattern is exact at block granularity.

The table (official ``gen_log_mask_shrinked``, reproduced exactly). For every frame pair, query
frame ``i`` and key frame ``j`` at distance ``dist = |i - j|``, an ``S x S`` token mask:

1. ``model_type="wan"`` and ``j == 0``: all on (frame 0 is an attention sink); otherwise
2. band ``|c - r| <= w``: ``w = S`` when ``dist <= 1``, else
   ``w = max(2^bl(S) / 2^bl(dist) * decay_factor, B)`` with ``bl = int.bit_length``;
3. AND "diagonal split" (temporal subsampling, without ``decay_factor``): with
   ``dl = 2^bl(S) / 2^bl(dist)``, the pair is kept iff ``dl >= split_threshold`` or
   ``dist % int(split_threshold / dl) == 0`` (the official code hard-codes 128, "equal to block
   size", for any ``B``; so for small ``S`` even ``dist = 1`` pairs can be dropped).

Each frame-pair mask is shrunk to tiles ("shrinkMaskStrict"): it is placed at offset
``(i*S % B, j*S % B)`` in a zero canvas whose top-left ``ceil(S/B) x ceil(S/B)`` tiles are kept
(rows/columns of the frame past them are dropped for this pair); a tile is on iff among its
columns with any on row more than 60 % have more than a third of the ``B`` rows on. The tiles are
OR-ed into the table at tile offset ``(i*S // B, j*S // B)``. Tile rows and columns from
``(frames * S) // B`` on (text tokens, and the last partial video tile) are all on.

The tile test is computed analytically: the on-rows of a column form an interval, so the
columns passing each density threshold form an interval too (O(1) per tile). The table costs
``frames x ceil(S/B)^2`` work per query frame, never ``L x L``; ``radial_table_reference``
builds it the official way, from the ``S x S`` masks, for the tests.

Confirmed in the official code at 72788d4 (``get_window_width``, ``get_diagonal_split_mask``,
``shrinkMaskStrict``, ``gen_log_mask_shrinked``; Wan and HunyuanVideo use block 128; the sink is
Wan-only since 2f61c30). Density arithmetic in integers (``3 * count > B``, ``5 * high > 3 * nonzero``)
equals the official float32 comparisons for ``B <= 1024``. Not modelled: Hunyuan's separate
padded-text masks (``pre_defined_mask``), and the dense first layers / timesteps schedule.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch

from ..errors import OptionError, ShapeError
from .base import Pattern
from .plan import EMPTY, FULL, PARTIAL, cdiv

MODEL_TYPES = ("hunyuan", "wan")


def frame_pair_rule(dist: int, S: int, B: int, decay_factor: float, split_threshold: int) -> tuple[bool, int]:
    """(kept, band width) of a frame pair at distance ``dist`` (official get_window_width and
    get_diagonal_split_mask; float arithmetic as there, the width floored for integer offsets)."""
    if dist <= 1:
        width = S
    else:
        decay = 2 ** S.bit_length() / 2 ** dist.bit_length() * decay_factor
        width = decay if decay >= B else B
    dl = 2 ** S.bit_length() / 2 ** dist.bit_length()
    kept = dl >= split_threshold or dist % int(split_threshold / dl) == 0
    return kept, math.floor(width)


@functools.lru_cache(maxsize=16)
def radial_table(frames: int, S: int, length: int, B: int, decay_factor: float, model_type: str,
                 split_threshold: int) -> torch.Tensor:
    """The tile table ``(cdiv(length, B), cdiv(length, B))`` bool (see module doc). Cached.

    Integer arithmetic in numpy: thousands of small array ops, which torch would hand to its
    thread pool (costly on a busy CPU)."""
    nb, cs = cdiv(length, B), cdiv(S, B)
    rules = [frame_pair_rule(d, S, B, decay_factor, split_threshold) for d in range(frames)]
    kept_by_dist = np.array([k for k, _ in rules])
    width_by_dist = np.array([min(w, S) for _, w in rules], dtype=np.int64)  # w >= S: the whole pair
    need = B // 3 + 1  # a column is dense when 3 * count > B
    tiles = np.arange(cs, dtype=np.int64) * B
    j = np.arange(frames, dtype=np.int64)
    col_off, col0 = (j * S) % B, (j * S) // B
    c0 = np.maximum(tiles[None, :] - col_off[:, None], 0)[:, None, :]  # (F, 1, cs) frame columns of each tile
    c1 = np.minimum(tiles[None, :] + B - 1 - col_off[:, None], S - 1)[:, None, :]
    cols = col0[:, None, None] + np.arange(cs)[None, None, :]  # (F, 1, cs) table columns
    table = np.zeros((nb, nb), dtype=bool)
    for i in range(frames):
        row_off, row0 = (i * S) % B, (i * S) // B
        r0 = np.maximum(tiles - row_off, 0)[None, :, None]  # (1, cs, 1) frame rows of each tile
        r1 = np.minimum(tiles + B - 1 - row_off, S - 1)[None, :, None]
        dist = np.abs(i - j)
        kept, w = kept_by_dist[dist], width_by_dist[dist]
        if model_type == "wan":  # frame 0 is an attention sink
            kept[0], w[0] = True, S
        w = w[:, None, None]
        nonzero = _overlap(c0, c1, r0 - w, r1 + w)
        dense = np.where((r1 - r0 + 1 >= need) & (2 * w + 1 >= need),
                         _overlap(c0, c1, r0 - w + need - 1, r1 + w + 1 - need), 0)
        on = kept[:, None, None] & (r0 <= r1) & (5 * dense > 3 * nonzero)  # (key frame, tile row, tile col)
        rows = row0 + np.arange(cs)[None, :, None]
        on &= (rows < nb) & (cols < nb)
        f, a, b = np.nonzero(on)
        table[row0 + a, col0[f] + b] = True
    border = (frames * S) // B
    table[border:, :] = True
    table[:, border:] = True
    return torch.from_numpy(table)


def _overlap(a0, a1, b0, b1):
    """Size of the intersection of integer intervals [a0, a1] and [b0, b1]."""
    return np.maximum(np.minimum(a1, b1) - np.maximum(a0, b0) + 1, 0)


def radial_table_reference(frames: int, S: int, length: int, B: int, decay_factor: float,
                           model_type: str, split_threshold: int) -> torch.Tensor:
    """The table built the official way: an ``S x S`` mask per frame pair, shrunk tile by tile
    from its column densities (loops; small sizes only)."""
    nb, cs = cdiv(length, B), cdiv(S, B)
    table = torch.zeros(nb, nb, dtype=torch.bool)
    r = torch.arange(S)[:, None]
    c = torch.arange(S)[None, :]
    for i in range(frames):
        for j in range(frames):
            if model_type == "wan" and j == 0:
                local = torch.ones(S, S, dtype=torch.bool)
            else:
                kept, w = frame_pair_rule(abs(i - j), S, B, decay_factor, split_threshold)
                local = ((c - r).abs() <= w) & kept
            ro, co = (i * S) % B, (j * S) % B
            canvas = torch.zeros(ro + cs * B, co + cs * B, dtype=torch.bool)
            canvas[ro:ro + S, co:co + S] = local
            canvas = canvas[:cs * B, :cs * B].reshape(cs, B, cs, B)
            count = canvas.sum(dim=1)  # (cs, cs, B): on rows per column of each tile
            nonzero = (count > 0).sum(-1)
            dense = (count / B > 1 / 3).sum(-1)
            on = dense / (nonzero + 1e-9) > 0.6
            r0, c0 = (i * S) // B, (j * S) // B
            for a in range(cs):
                for b in range(cs):
                    if on[a, b] and r0 + a < nb and c0 + b < nb:
                        table[r0 + a, c0 + b] = True
    border = (frames * S) // B
    table[border:, :] = True
    table[:, border:] = True
    return table


class Radial(Pattern):
    """Radial Attention's tile mask (see module doc); ``L - frames * tokens_per_frame`` trailing
    text tokens are dense."""

    def __init__(self, frames: int, tokens_per_frame: int, decay_factor: float = 1.0, mask_block: int = 128,
                 model_type: str = "hunyuan", split_threshold: int = 128):
        for name, v in (("frames", frames), ("tokens_per_frame", tokens_per_frame), ("mask_block", mask_block),
                        ("split_threshold", split_threshold)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise OptionError(f"radial: {name}={v!r} is invalid; it must be an int >= 1.")
        if isinstance(decay_factor, bool) or not isinstance(decay_factor, (int, float)) or not decay_factor > 0:
            raise OptionError(f"radial: decay_factor={decay_factor!r} is invalid; it must be a number > 0 "
                              "(official scripts: 0.95 HunyuanVideo, 0.2 Wan2.1).")
        if model_type not in MODEL_TYPES:
            raise OptionError(f"radial: model_type={model_type!r} is invalid; it must be one of {MODEL_TYPES} "
                              "('wan' adds the frame-0 attention sink).")
        self.frames, self.tokens_per_frame = frames, tokens_per_frame
        self.decay_factor, self.mask_block = float(decay_factor), mask_block
        self.model_type, self.split_threshold = model_type, split_threshold

    @property
    def video_tokens(self) -> int:
        return self.frames * self.tokens_per_frame

    def check(self, q_len, k_len):
        if q_len != k_len:
            raise ShapeError(f"{self.describe()} is self-attention: it needs Lq == Lk, got Lq={q_len}, Lk={k_len}.")
        if q_len < self.video_tokens:
            raise ShapeError(
                f"{self.describe()}: L={q_len} is shorter than frames * tokens_per_frame = {self.video_tokens} "
                "video tokens (text tokens, if any, follow the video).")

    def table(self, length: int) -> torch.Tensor:
        return radial_table(self.frames, self.tokens_per_frame, length, self.mask_block, self.decay_factor,
                            self.model_type, self.split_threshold)

    def params(self, q_len, k_len):
        return {"table": self.table(q_len), "block": self.mask_block}

    def rule(self, b, h, q, k, p):
        return p["table"][q // p["block"], k // p["block"]]

    def _plan(self, q_len, k_len, block_q, block_k, device):
        B = self.mask_block
        table = self.table(q_len).to(torch.long)
        acc = torch.nn.functional.pad(table.cumsum(0).cumsum(1), (1, 0, 1, 0))  # acc[r, c] = sum table[:r, :c]

        def spans(length, block):  # table rows / columns touched by each engine block
            first = torch.arange(cdiv(length, block)) * block
            last = torch.clamp(first + block, max=length) - 1
            return first // B, last // B + 1

        r0, r1 = (x[:, None] for x in spans(q_len, block_q))
        c0, c1 = (x[None, :] for x in spans(k_len, block_k))
        on = acc[r1, c1] - acc[r0, c1] - acc[r1, c0] + acc[r0, c0]
        states = torch.where(on > 0, torch.where(on == (r1 - r0) * (c1 - c0), FULL, PARTIAL), EMPTY)
        return states.to(torch.int8).to(device)

    def describe(self):
        extra = "" if self.model_type == "hunyuan" else f", model_type={self.model_type!r}"
        extra += "" if self.split_threshold == 128 else f", split_threshold={self.split_threshold}"
        return (f"radial(frames={self.frames}, tokens_per_frame={self.tokens_per_frame}, "
                f"decay_factor={self.decay_factor:g}, mask_block={self.mask_block}{extra})")


def radial(frames: int, tokens_per_frame: int, decay_factor: float = 1.0, mask_block: int = 128,
           model_type: str = "hunyuan", split_threshold: int = 128) -> Radial:
    """Radial Attention over ``frames x tokens_per_frame`` video tokens (text tokens after them dense)."""
    return Radial(frames, tokens_per_frame, decay_factor, mask_block, model_type, split_threshold)


__all__ = ["Radial", "radial", "radial_table", "radial_table_reference", "frame_pair_rule"]
