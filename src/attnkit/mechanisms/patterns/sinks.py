"""``sinks``: StreamingLLM (Xiao et al. 2023, arXiv 2309.17453): the first ``sinks`` keys plus the last
``window`` keys including the query itself, causal (mask mode; see :mod:`attnkit.patterns.sinks`
for what was confirmed in the official cache code). Decoding through ``ak.nn.Attention`` reproduces
the prefill rows; the blocksparse engine visits only the sink column tiles and the diagonal band.
"""

from __future__ import annotations

from ...call import CAUSAL_PATTERNS
from ...options import Option
from ...patterns.sinks import sinks
from ...registry import MethodInfo, options, register
from ..pattern_method import BLOCK_SIZE, MASK_BACKENDS, PatternMethod


@register
class SinksMethod(PatternMethod):
    info = MethodInfo(
        name="sinks", family="P", kind="exact", patterns=CAUSAL_PATTERNS, decode=True,
        summary="StreamingLLM: attention sinks (first keys) + a recent window, causal",
        backends=MASK_BACKENDS, accepts_mask=True,
        options=options(
            Option("sinks", "int", 4, "first keys every query sees (official start_size)", low=0),
            Option("window", "int", 2000, "last keys seen, including the query (official recent_size)", low=1),
            BLOCK_SIZE),
        references="Xiao et al. 2023, arXiv 2309.17453; github.com/mit-han-lab/streaming-llm kv_cache.py")

    def build_pattern(self, call):
        return sinks(call.options["sinks"], call.options["window"])

    def bench_options(self, q_len, k_len, density=None):
        """4 sinks and a window of Lk/8 keys; for ``density`` (causal: kept pairs ~ w L - w^2/2)
        the window ``w = L (1 - sqrt(1 - 2 density))``."""
        if density is None:
            return {"sinks": 4, "window": max(16, k_len // 8)}
        d = min(density, 0.5)
        return {"sinks": 4, "window": max(1, round(k_len * (1 - (1 - 2 * d) ** 0.5)))}

    def sample_options(self, rng, q_len, k_len):
        return {"sinks": int(rng.integers(0, 6)), "window": int(rng.integers(1, max(2, k_len + 3))),
                "block_size": int(rng.choice([16, 32]))}
