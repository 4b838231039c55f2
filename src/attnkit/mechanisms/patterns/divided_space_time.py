"""``divided_space_time``: Seer / TimeSformer divided space-time attention as one union mask.

Over ``grid = (T, H, W)`` or ``(T, S)`` (frames first; or ``frames`` / ``tokens_per_frame`` for
``(T, S)``) a token sees its whole frame (space) OR the tokens of its spatial window in every frame
(time; ``window = 1``: the same position; ``causal_time``: earlier frames only). One softmax over the
union, not the two attentions in sequence; see :class:`attnkit.patterns.video.DividedSpaceTime` for
exactly what it is and how it relates to Seer's official layers. Non-causal self-attention only.
"""

from __future__ import annotations

from ...call import pattern_name
from ...options import Option
from ...patterns.video import DividedSpaceTime
from ...registry import MethodInfo, options, register
from ..pattern_method import BLOCK_SIZE, MASK_BACKENDS, TOKEN_ORDER, PatternMethod
from ._grid import random_grid, sample_block_size
from .radial import FRAMES, TOKENS_PER_FRAME, VIDEO_GRID, video_layout
from ._grid import bench_grid


@register
class DividedSpaceTimeMethod(PatternMethod):
    info = MethodInfo(
        name="divided_space_time", family="P", kind="exact", patterns=frozenset({pattern_name(False, True)}),
        seed=(15,), summary="Seer/TimeSformer divided attention as one mask: own frame OR same spatial window",
        backends=MASK_BACKENDS, accepts_mask=True,
        options=options(
            VIDEO_GRID, FRAMES, TOKENS_PER_FRAME,
            Option("window", "ints", 1, "spatial window of the time term per spatial dimension (1 = same "
                   "position; Seer: 4 or 8)", low=1),
            Option("causal_time", "bool", False, "time term sees earlier frames only"),
            TOKEN_ORDER, BLOCK_SIZE),
        references="Gu et al. 2024 (Seer, arXiv 2303.14897); Bertasius et al. 2021 (TimeSformer, 2102.05095)")

    def build_pattern(self, call):
        o = call.options
        layout = video_layout("divided_space_time", o, call.q_len)  # checks grid / frames against L
        grid = layout if o["grid"] is None else o["grid"]
        return DividedSpaceTime(grid, o["window"], o["causal_time"])

    def bench_options(self, q_len, k_len, density=None):
        """A (frames, height, width) layout; spatial window 1 (the same position across frames)."""
        if density is not None:
            return super().bench_options(q_len, k_len, density)
        return {"grid": bench_grid(q_len, 3)}

    def sample_options(self, rng, q_len, k_len):
        grid = random_grid(rng, q_len, max_rank=3, min_rank=2)
        window = tuple(int(rng.integers(1, n + 1)) for n in grid[1:])
        return {"grid": grid, "window": window, "causal_time": bool(rng.random() < 0.3),
                "block_size": sample_block_size(rng, q_len)}
