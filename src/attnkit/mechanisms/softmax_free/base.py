"""Shared parts of the activation methods (``sigmoid``, ``softplus``): score -> elementwise
activation -> optional row normalisation, over the causal / noncausal / sliding-window patterns.

They run on the activation engines (:mod:`attnkit.backends.activation`): ``triton`` (GPU kernels,
plain causal / noncausal only), ``blocksparse`` (tiles of the pattern, CPU and GPU, memory
``O(L x window)``) and ``dense`` (explicit matrices). FlexAttention cannot run them: its kernel is a
softmax. The methods are not softmax attention, so their kind is ``approximate``: they are tested
against their own ``reference`` (the readable dense definition), not against the oracle.
"""

from __future__ import annotations

import torch

from ...backends.activation import (
    ActivationSpec,
    BlockSparseActivationEngine,
    DenseActivationEngine,
    qk_layer_norm,
)
from ...backends.triton import TritonActivationEngine
from ...call import AttentionCall
from ...options import Option
from ...patterns.interval import Full, SlidingWindow, window_sides
from ...registry import Method

ENGINES = (TritonActivationEngine(), BlockSparseActivationEngine(), DenseActivationEngine())
BACKENDS = tuple(e.name for e in ENGINES)

WINDOW = Option("window", "int", None, "sliding window: causal = the last `window` keys incl. self; "
                "noncausal = window//2 keys each side (None = every key)", low=1, nullable=True)
QK_NORM = Option("qk_norm", "bool", False, "layer-normalise q and k over the head dim before the "
                 "scores (no learnable gain: gains belong to a layer)")
BLOCK_SIZE = Option("block_size", "int", 128, "tile size of the blocksparse engine (a performance "
                    "knob: results do not depend on it)", low=16, high=1024, tuning=True)


class ActivationMethod(Method):
    """Subclasses give ``activation(call)``, ``normalization(call)`` and optionally
    ``sharpening(call)``; options ``window``, ``qk_norm`` and ``block_size`` are handled here."""

    def activation(self, call: AttentionCall):
        raise NotImplementedError

    def normalization(self, call: AttentionCall) -> str:
        return "none"

    def sharpening(self, call: AttentionCall) -> tuple[float, float] | None:
        return None

    def engines(self):
        return ENGINES

    def pattern(self, call: AttentionCall):
        window = call.options["window"]
        if window is None:
            return Full(call.is_causal)
        left, right = window_sides(window, None, None, call.is_causal, self.info.name)
        return SlidingWindow(left, right, call.is_causal)

    def prepare(self, call: AttentionCall) -> ActivationSpec:
        return ActivationSpec(self.pattern(call), self.activation(call), self.normalization(call),
                              self.sharpening(call), call.options["qk_norm"], call.options["block_size"])

    # -- the readable definition, shared pieces ---------------------------------------------
    def visible(self, call: AttentionCall) -> torch.Tensor:
        """Bool ``(B|1, H|1, Lq, Lk)``: key j visible to query i (window, causal, bool mask)."""
        i = torch.arange(call.q_len, device=call.device)[:, None] + call.causal_offset
        j = torch.arange(call.k_len, device=call.device)[None, :]
        keep = torch.ones(call.q_len, call.k_len, dtype=torch.bool, device=call.device)
        if call.options["window"] is not None:
            left, right = window_sides(call.options["window"], None, None, call.is_causal)
            keep = (j >= i - left) & (j <= i + right)
        if call.is_causal:
            keep = keep & (j <= i)
        keep = keep[None, None]
        if call.attn_mask is not None and call.attn_mask.dtype == torch.bool:
            keep = keep & call.attn_mask
        return keep

    def scores(self, call: AttentionCall):
        """``s = scale q k^T (+ float attn_mask)`` in float64, the visible mask (keys with s = -inf
        hidden) and the values (repeated to H heads under GQA)."""
        k, v = (t.to(torch.float64) for t in call.expanded_kv())
        q = call.query.to(torch.float64)
        if call.options["qk_norm"]:
            q, k = qk_layer_norm(q), qk_layer_norm(k)
        s = call.scale * (q @ k.transpose(-1, -2))
        if call.attn_mask is not None and call.attn_mask.dtype != torch.bool:
            s = s + call.attn_mask.to(torch.float64)
        keep = self.visible(call) & (s > float("-inf"))
        return s, keep, v
