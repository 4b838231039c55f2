"""StreamingLLM attention sinks (Xiao et al. 2023, arXiv 2309.17453): the first ``sinks`` keys plus
a sliding window of the last ``window`` keys, causal::

    visible(i, j) = j <= i  and  (j < sinks  or  j > i - window)

with ``i`` the bottom-right aligned query position. The window includes the query itself: the
official cache (mit-han-lab/streaming-llm, ``streaming_llm/kv_cache.py`` read at d729b3f,
``StartRecentKVCache.evict_for_space(past, num_coming)``) keeps ``recent_size - num_coming`` old
tokens before appending the new one, so a decoding token sees ``start_size`` sinks and
``recent_size`` recent keys counting itself (``window`` = ``recent_size``, ``sinks`` =
``start_size``; defaults 4 / 2000 as the official streaming demo, ``examples/run_streaming_llama.py``).
This is the mask mode: positions are the original ones. The official "pos_shift" re-rotates cached
keys by their cache slot, which is not expressible on already-rotated q / k and is not done here.
"""

from __future__ import annotations

import torch

from ..errors import OptionError
from .base import Pattern
from .tiles import key_tiles, query_tiles, span, span_present, states, union_covers


class Sinks(Pattern):
    """Causal sinks + recent window (module doc). Build it with :func:`sinks`."""

    def __init__(self, sinks: int, window: int):
        self.sinks, self.window = sinks, window

    def params(self, q_len, k_len):
        return {"offset": k_len - q_len, "sinks": self.sinks, "window": self.window}

    def rule(self, b, h, q, k, p):
        qa = q + p["offset"]
        return (k <= qa) & ((k < p["sinks"]) | (k > qa - p["window"]))

    def _plan(self, q_len, k_len, block_q, block_k, device):
        p = self.params(q_len, k_len)
        qf, ql = (x[:, None] for x in query_tiles(q_len, k_len, block_q, device))
        ks, ke = key_tiles(k_len, block_k, device)
        recent = span(lambda qa: (qa - p["window"] + 1, qa), qf, ql)
        first = span(lambda qa: (torch.zeros_like(qa), torch.clamp(qa, max=p["sinks"] - 1)), qf, ql)
        present = span_present(recent, ks, ke) | span_present(first, ks, ke)
        return states(present, union_covers(recent, first, ks, ke))

    def describe(self):
        return f"sinks(sinks={self.sinks}, window={self.window})"


def sinks(sinks: int = 4, window: int = 2000) -> Sinks:
    """StreamingLLM: the first ``sinks`` keys and the last ``window`` keys (including the query
    itself), causal, bottom-right aligned."""
    if isinstance(sinks, bool) or not isinstance(sinks, int) or sinks < 0:
        raise OptionError(f"sinks: sinks={sinks!r} is invalid; it must be an int >= 0 (the first keys "
                          "every query sees; the official default is 4).")
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise OptionError(f"sinks: window={window!r} is invalid; it must be an int >= 1 (the last keys "
                          "including the query itself; the official default is 2000).")
    return Sinks(sinks, window)
