"""``frame_causal``: AR-Diffusion's temporal causal attention over frames.

A token sees every token of its own frame and of earlier frames (block-causal over frames; within a
frame, full), plus ``context_tokens`` leading context (text) tokens, which see everything
(``context_attends="all"``, the released configs) or only the context (``"context"``). Give
``frames`` or ``tokens_per_frame`` (or ``grid=(T, ...)``). The mask is not causal in token order, so
the method is a non-causal self-attention pattern (``is_causal=True`` would reduce it to plain causal
attention and is refused). Details and what was confirmed in iva-mzsun/AR-Diffusion:
:class:`attnkit.patterns.video.FrameCausal`.
"""

from __future__ import annotations

from ...call import pattern_name
from ...errors import OptionError
from ...options import Option
from ...patterns.video import CONTEXT_ATTENDS, FrameCausal
from ...registry import MethodInfo, options, register
from ..pattern_method import BLOCK_SIZE, MASK_BACKENDS, PatternMethod
from ._grid import divisors, sample_block_size
from .radial import FRAMES, TOKENS_PER_FRAME, VIDEO_GRID, bench_frames, video_layout


@register
class FrameCausalMethod(PatternMethod):
    info = MethodInfo(
        name="frame_causal", family="P", kind="exact", patterns=frozenset({pattern_name(False, True)}), seed=(43,),
        summary="temporal causal attention over frames (AR-Diffusion): own frame and earlier frames",
        backends=MASK_BACKENDS, accepts_mask=True,
        options=options(
            FRAMES, TOKENS_PER_FRAME, VIDEO_GRID,
            Option("context_tokens", "int", 0, "leading context (text) tokens, visible to every token", low=0),
            Option("context_attends", "choice", "all", "what context tokens see: 'all' (official "
                   "video_temporal_causal) or 'context' (temporal_causal)", choices=CONTEXT_ATTENDS),
            BLOCK_SIZE),
        references="Sun et al. 2025 (AR-Diffusion, CVPR 2025); iva-mzsun/AR-Diffusion")

    def build_pattern(self, call):
        o = call.options
        video = call.q_len - o["context_tokens"]
        if video <= 0:
            raise OptionError(f"method 'frame_causal': context_tokens={o['context_tokens']} leaves no video "
                              f"tokens of L={call.q_len}.")
        frames, per_frame = video_layout("frame_causal", o, video)
        return FrameCausal(per_frame, frames, o["context_tokens"], o["context_attends"])

    def bench_options(self, q_len, k_len, density=None):
        """Eight frames (four for short sequences) of ``L / frames`` tokens each."""
        if density is not None:
            return super().bench_options(q_len, k_len, density)
        return {"frames": bench_frames(q_len)}

    def sample_options(self, rng, q_len, k_len):
        context = int(rng.integers(0, q_len // 4 + 1)) if rng.random() < 0.5 else 0
        per_frame = int(rng.choice(divisors(q_len - context)))
        return {"tokens_per_frame": per_frame, "context_tokens": context,
                "context_attends": str(rng.choice(CONTEXT_ATTENDS)), "block_size": sample_block_size(rng, q_len)}
