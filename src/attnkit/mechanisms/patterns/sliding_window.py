"""``sliding_window``: local attention, key j visible to query i iff ``i - left <= j <= i + right``
(bottom-right aligned positions; also ``j <= i`` when causal).

``window`` is the usual shorthand: causal, the last ``window`` keys including the query itself
(``left = window - 1, right = 0``, as in Mistral / StreamingLLM); noncausal, ``window // 2`` keys on
each side (Longformer-style). Runs on the blocksparse engine (only tiles near the diagonal) and
on the dense engine (masked SDPA).
"""

from __future__ import annotations

from ...call import ALL_PATTERNS
from ...options import Option
from ...patterns.interval import SlidingWindow, window_sides
from ...registry import MethodInfo, options, register
from ..pattern_method import BLOCK_SIZE, MASK_BACKENDS, PatternMethod

BENCH_WINDOW = 16  # CAB's local attention window (Shark-NLP/CAB efficiency-length script)


@register
class SlidingWindowMethod(PatternMethod):
    info = MethodInfo(
        name="sliding_window", family="P", kind="exact", patterns=ALL_PATTERNS, decode=True,
        summary="local window attention (left/right keys around each query)",
        backends=MASK_BACKENDS, accepts_mask=True,
        options=options(
            Option("window", "int", None, "shorthand: causal = last `window` keys incl. self; "
                   "noncausal = window//2 each side", low=1, nullable=True),
            Option("left", "int", None, "keys visible before the query", low=0, nullable=True),
            Option("right", "int", None, "keys visible after the query (cut by causal)", low=0, nullable=True),
            BLOCK_SIZE),
        references="Beltagy et al. 2020 (Longformer); Jiang et al. 2023 (Mistral)")

    def build_pattern(self, call):
        o = call.options
        left, right = window_sides(o["window"], o["left"], o["right"], call.is_causal)
        return SlidingWindow(left, right, call.is_causal)

    def sample_options(self, rng, q_len, k_len):
        if rng.random() < 0.5:
            return {"window": int(rng.integers(1, max(2, k_len + 3)))}
        return {"left": int(rng.integers(0, k_len + 2)), "right": int(rng.integers(0, k_len + 2))}

    def bench_options(self, q_len, k_len, density=None):
        """A fixed ``window`` of 16 keys, CAB's local attention (cost linear in L); with ``density``, ``window = round(density * k_len)``, which keeps about that share of
        the ``q_len x k_len`` pairs causal or not (fewer at the sequence edges)."""
        if density is None:
            return {"window": BENCH_WINDOW}
        return {"window": max(1, round(density * k_len))}
