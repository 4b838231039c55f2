"""``radial``: Radial Attention's static energy-decay mask for video diffusion transformers.

The sequence is ``frames x tokens_per_frame`` video tokens (frame after frame) followed by
``text_tokens`` text tokens (dense). Give ``frames`` or ``tokens_per_frame`` (or both), or
``grid=(T, H, W)`` / ``(T, S)``. The mask lives on ``mask_block`` tiles (official 128 or 64);
``decay_factor`` scales the spatial window (official scripts: 0.95 HunyuanVideo, 0.2 Wan2.1);
``model_type="wan"`` adds the frame-0 sink; ``split_threshold`` is the constant the official code
hard-codes to 128 in its temporal subsampling. Non-causal self-attention only. Mask construction and
what was confirmed in mit-han-lab/radial-attention: :mod:`attnkit.patterns.radial`.
"""

from __future__ import annotations

from math import prod

from ...call import pattern_name
from ...errors import OptionError
from ...options import Option
from ...patterns.grid import check_grid
from ...patterns.radial import MODEL_TYPES, Radial
from ...registry import MethodInfo, options, register
from ..pattern_method import BLOCK_SIZE, MASK_BACKENDS, PatternMethod
from ._grid import divisors, resolve_frames, sample_block_size

FRAMES = Option("frames", "int", None, "number of frames (or give tokens_per_frame / grid)", low=1, nullable=True)
TOKENS_PER_FRAME = Option("tokens_per_frame", "int", None, "tokens per frame (or give frames / grid)", low=1,
                          nullable=True)
VIDEO_GRID = Option("grid", "ints", None, "video layout (T, H, W) or (T, S), frames first; alternative to "
                    "frames / tokens_per_frame", low=1, nullable=True)


def video_layout(method: str, o: dict, video: int) -> tuple[int, int]:
    """(frames, tokens_per_frame) from ``grid`` or ``frames`` / ``tokens_per_frame``."""
    if o["grid"] is not None:
        grid = check_grid(o["grid"], owner=f"method {method!r}")
        if len(grid) < 2:
            raise OptionError(f"method {method!r}: grid={grid} needs frames first and the frame's layout after, "
                              "e.g. (T, H, W) or (T, S).")
        frames, per_frame = grid[0], prod(grid[1:])
        if o["frames"] not in (None, frames) or o["tokens_per_frame"] not in (None, per_frame):
            raise OptionError(
                f"method {method!r}: grid={grid} means frames={frames}, tokens_per_frame={per_frame}, but "
                f"frames={o['frames']}, tokens_per_frame={o['tokens_per_frame']} were given; pass one description.")
        if frames * per_frame != video:
            raise OptionError(
                f"method {method!r}: grid={grid} has {frames * per_frame} cells but there are {video} video "
                "tokens; tokens are the grid's cells in row-major order (frames first), so prod(grid) must "
                "equal the number of video tokens.")
        return frames, per_frame
    return resolve_frames(method, o["frames"], o["tokens_per_frame"], video)


def bench_frames(length: int) -> int:
    """The benchmark's video layout: eight frames (four for short sequences) of ``L / frames`` tokens."""
    frames = 8 if length % 8 == 0 and length >= 256 else 4
    if length % frames:
        raise OptionError(f"L={length} does not split into {frames} frames")
    return frames


@register
class RadialMethod(PatternMethod):
    info = MethodInfo(
        name="radial", family="P", kind="exact", patterns=frozenset({pattern_name(False, True)}), seed=(23,),
        summary="Radial Attention: video mask whose spatial window halves as the frame distance doubles",
        backends=MASK_BACKENDS, accepts_mask=True,
        options=options(
            FRAMES, TOKENS_PER_FRAME, VIDEO_GRID,
            Option("text_tokens", "int", 0, "dense text tokens after the video tokens", low=0),
            Option("decay_factor", "float", 1.0, "scales the spatial window of distant frames (API default 1; "
                   "scripts 0.95 HunyuanVideo, 0.2 Wan2.1)", low=0, open_low=True),
            Option("mask_block", "int", 128, "tile size of the radial mask (official 128 or 64; changes the "
                   "mask, unlike block_size)", low=1),
            Option("model_type", "choice", "hunyuan", "'wan' makes frame 0 an attention sink",
                   choices=MODEL_TYPES),
            Option("split_threshold", "int", 128, "temporal subsampling constant (official code: 128)", low=1),
            BLOCK_SIZE),
        references="Li et al. 2025 (Radial Attention, arXiv 2506.19852); mit-han-lab/radial-attention")

    def build_pattern(self, call):
        o = call.options
        video = call.q_len - o["text_tokens"]
        if video <= 0:
            raise OptionError(
                f"method 'radial': text_tokens={o['text_tokens']} leaves no video tokens of L={call.q_len}.")
        frames, per_frame = video_layout("radial", o, video)
        return Radial(frames, per_frame, o["decay_factor"], o["mask_block"], o["model_type"], o["split_threshold"])

    def bench_options(self, q_len, k_len, density=None):
        """Eight frames (four for short sequences) of ``L / frames`` tokens each."""
        if density is not None:
            return super().bench_options(q_len, k_len, density)
        return {"frames": bench_frames(q_len)}

    def sample_options(self, rng, q_len, k_len):
        text = int(rng.integers(0, q_len // 4 + 1))
        frames = int(rng.choice(divisors(q_len - text)))
        return {"frames": frames, "text_tokens": text, "decay_factor": float(rng.choice([0.2, 0.5, 0.95, 1.0, 2.0])),
                "mask_block": int(rng.choice([1, 2, 3, 4, 8])), "model_type": str(rng.choice(MODEL_TYPES)),
                "split_threshold": int(rng.choice([1, 2, 4, 8, 16, 128])), "block_size": sample_block_size(rng, q_len)}
