"""Video patterns over frames of tokens: ``frame_causal`` (AR-Diffusion) and ``divided_space_time`` (Seer).

Tokens are frame after frame; inside a frame, row-major (see :mod:`attnkit.patterns.grid`).
"""

from __future__ import annotations

import torch

from ..errors import OptionError, ShapeError
from .base import Pattern
from .grid import GridPattern, _fmt, per_dim
from .plan import EMPTY, FULL, PARTIAL, cdiv

CONTEXT_ATTENDS = ("all", "context")


class FrameCausal(Pattern):
    """Temporal causal attention over frames (AR-Diffusion, Sun et al. CVPR 2025; official code
    iva-mzsun/AR-Diffusion ``src/ardiff/modules/dit_model.py``, ``causal_attn_mode``).

    The sequence is ``context_tokens`` context (text) tokens followed by frames of
    ``tokens_per_frame`` tokens. A video token sees every context token and every token of its own
    frame and of earlier frames: key ``j`` is visible to video query ``i`` iff
    ``j < C + (f + 1) * S`` with ``f = (i - C) // S`` its frame. A context query sees every token
    (``context_attends="all"``, the official ``video_temporal_causal`` mode, used by the released
    configs) or only the context (``"context"``, the official ``temporal_causal`` mode). The mask
    is block-causal, not causal in token order (a token sees later tokens of its own frame), so it
    is a non-causal self-attention pattern in attnkit's sense.

    Confirmed in the official code: the video block is ``triu(-inf, 1)`` over frames repeated
    ``n_token_per_frame x n_token_per_frame``; context tokens come first; ``temporal_causal`` masks
    context rows to the context, ``video_temporal_causal`` leaves them unmasked.
    """

    def __init__(self, tokens_per_frame: int, frames: int | None = None, context_tokens: int = 0,
                 context_attends: str = "all"):
        for name, v, low in (("tokens_per_frame", tokens_per_frame, 1), ("context_tokens", context_tokens, 0)):
            if not isinstance(v, int) or isinstance(v, bool) or v < low:
                raise OptionError(f"frame_causal: {name}={v!r} is invalid; it must be an int >= {low}.")
        if frames is not None and (not isinstance(frames, int) or isinstance(frames, bool) or frames < 1):
            raise OptionError(f"frame_causal: frames={frames!r} is invalid; it must be an int >= 1 (or None).")
        if context_attends not in CONTEXT_ATTENDS:
            raise OptionError(f"frame_causal: context_attends={context_attends!r} is invalid; it must be one of "
                              f"{CONTEXT_ATTENDS}.")
        self.tokens_per_frame, self.frames = tokens_per_frame, frames
        self.context_tokens, self.context_attends = context_tokens, context_attends

    def check(self, q_len, k_len):
        if q_len != k_len:
            raise ShapeError(f"{self.describe()} is self-attention: it needs Lq == Lk, got Lq={q_len}, Lk={k_len}.")
        C, S = self.context_tokens, self.tokens_per_frame
        video = q_len - C
        if video <= 0 or video % S or (self.frames is not None and video != self.frames * S):
            want = f"{self.frames} frames x {S}" if self.frames is not None else f"a positive multiple of {S}"
            raise ShapeError(
                f"{self.describe()}: L={q_len} leaves {video} video tokens after {C} context tokens; "
                f"it must be {want} tokens per frame.")

    def params(self, q_len, k_len):
        C = self.context_tokens
        return {"frame": self.tokens_per_frame, "context": C,
                "context_hi": k_len - 1 if self.context_attends == "all" else C - 1}

    def last_key(self, q, p):
        """The last visible key of each query (every key up to it is visible)."""
        C, S = p["context"], p["frame"]
        video = C + ((q - C) // S + 1) * S - 1
        return torch.where(q < C, p["context_hi"], video)

    def rule(self, b, h, q, k, p):
        return k <= self.last_key(q, p)

    def _plan(self, q_len, k_len, block_q, block_k, device):
        p = self.params(q_len, k_len)
        C = p["context"]
        first = torch.arange(cdiv(q_len, block_q)) * block_q
        last = torch.clamp(first + block_q, max=q_len) - 1
        # last-key bounds over each block's rows: the context part is constant, the video part
        # is nondecreasing, so its extremes sit at the block's first and last video rows
        video_first = self.last_key(torch.maximum(first, torch.tensor(C)), p)
        video_last = self.last_key(last, p)
        has_ctx, has_video = first < C, last >= C
        ctx = torch.tensor(p["context_hi"])
        big = torch.tensor(k_len)
        lowest = torch.minimum(torch.where(has_ctx, ctx, big), torch.where(has_video, video_first, big))
        highest = torch.maximum(torch.where(has_ctx, ctx, -1), torch.where(has_video, video_last, -1))
        ks = torch.arange(cdiv(k_len, block_k)) * block_k
        ke = torch.clamp(ks + block_k, max=k_len) - 1
        present = ks[None, :] <= highest[:, None]
        full = ke[None, :] <= lowest[:, None]
        return torch.where(present, torch.where(full, FULL, PARTIAL), EMPTY).to(torch.int8).to(device)

    def describe(self):
        extra = f", frames={self.frames}" if self.frames is not None else ""
        if self.context_tokens:
            extra += f", context_tokens={self.context_tokens}, context_attends={self.context_attends!r}"
        return f"frame_causal(tokens_per_frame={self.tokens_per_frame}{extra})"


class DividedSpaceTime(GridPattern):
    """Divided space-time attention as one mask (Seer, Gu et al. ICLR 2024, arXiv 2303.14897).

    ``grid = (T, ...spatial)`` (frames first, e.g. ``(T, H, W)`` or ``(T, S)``). Key ``y`` is
    visible to query ``x`` iff

    - space: same frame, ``y_0 == x_0`` (any spatial position), OR
    - time: same spatial window, ``y_d // window_d == x_d // window_d`` for every spatial dimension
      ``d``, in any frame (``causal_time``: frames ``y_0 <= x_0`` only).

    ``window = 1`` is TimeSformer's divided attention (temporal attention at the same position).
    This is the union of the two masks in ONE softmax, not the two attentions applied one after
    the other as in the models: a token's weights are shared between its frame and its tube.

    Seer's U-Net (official seervideodiffusion/SeerVideoLDM, ``seer/models/attention.py``) runs
    spatial self-attention inside each frame (``BasicTransformerBlock3D`` with ``temporal=False``:
    ``(b f) (h w)``) and, in separate layers, ``WindowSTempAttention``: full attention among all
    frames' tokens inside one ``win_size x win_size`` spatial window (``window_partition``), which
    is the time term here with ``window = win_size`` (Seer: 8 when the map has >= 32 rows, else 4;
    the whole frame when it has <= 4 rows); its ``causal`` flag builds a mask from the
    wrong axes and is not applied to the windowed tensors, so ``causal_time`` is not Seer's.

    The analytic block plan is exact: on a box pair the union is full iff one of the terms is
    (if space fails at frames ``t != t'`` and time fails at spatial positions ``s, s'`` of
    different windows, or at frames ``t' > t`` when causal, the pair ``(t, s), (t', s')`` is
    invisible to both terms).
    """

    terms = 2
    name = "divided_space_time"

    def __init__(self, grid, window=1, causal_time: bool = False):
        super().__init__(grid)
        if self.rank < 2:
            raise OptionError(f"divided_space_time: grid={self.grid} needs frames first and at least one spatial "
                              "dimension, e.g. (T, H, W) or (T, S).")
        self.window = per_dim(window, self.rank - 1, "window", owner=self.name)
        if not isinstance(causal_time, bool):
            raise OptionError(f"divided_space_time: causal_time={causal_time!r} must be True or False.")
        self.causal_time = causal_time

    def settings(self, q_len, k_len):
        return {**super().settings(q_len, k_len), "window": torch.tensor(self.window),
                "causal_time": torch.tensor(self.causal_time)}

    def axis_bounds(self, term, d, u, n, p):
        if term == 0:  # space: the query's own frame, every spatial position
            return (u, u) if d == 0 else (torch.zeros_like(u), torch.zeros_like(u) + n - 1)
        if d == 0:  # time: every frame (or the earlier ones)
            return torch.zeros_like(u), torch.where(p["causal_time"], u, n - 1)
        w = p["window"][d - 1]
        start = (u // w) * w
        return start, start + w - 1

    def describe(self):
        extra = f", window={_fmt(self.window)}" if any(w != 1 for w in self.window) else ""
        extra += ", causal_time=True" if self.causal_time else ""
        return f"divided_space_time({self._grid_text()}{extra})"


def frame_causal(tokens_per_frame: int, frames: int | None = None, context_tokens: int = 0,
                 context_attends: str = "all") -> FrameCausal:
    """AR-Diffusion's temporal causal mask: a token sees its own frame and earlier frames."""
    return FrameCausal(tokens_per_frame, frames, context_tokens, context_attends)


def divided_space_time(grid, window=1, causal_time: bool = False) -> DividedSpaceTime:
    """Seer / TimeSformer divided attention as one union mask over ``grid = (T, ...spatial)``."""
    return DividedSpaceTime(grid, window, causal_time)


__all__ = ["FrameCausal", "DividedSpaceTime", "frame_causal", "divided_space_time"]
