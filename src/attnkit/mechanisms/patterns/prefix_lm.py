"""``prefix_lm``: bidirectional attention over the first ``prefix`` keys, causal after (prefix LM).
The pattern holds its own causal part, so it is run with ``is_causal=False`` (``is_causal=True``
would remove the bidirectional prefix); see :mod:`attnkit.patterns.prefix`.
"""

from __future__ import annotations

import torch

from ...call import pattern_name
from ...errors import OptionError
from ...options import Option
from ...patterns.prefix import prefix_lm
from ...registry import MethodInfo, options, register
from ..pattern_method import BLOCK_SIZE, MASK_BACKENDS, PatternMethod


@register
class PrefixLMMethod(PatternMethod):
    info = MethodInfo(
        name="prefix_lm", family="P", kind="exact", accepts_mask=True, backends=MASK_BACKENDS,
        patterns=frozenset({pattern_name(False, True), pattern_name(False, False)}),
        summary="prefix LM: bidirectional over a prefix, causal after (pass is_causal=False)",
        options=options(
            Option("prefix", "object", None, "prefix length: an int >= 0 or a (B,) integer tensor"),
            BLOCK_SIZE),
        references="Raffel et al. 2020 (T5, arXiv 1910.10683); Dong et al. 2019 (UniLM)")

    def build_pattern(self, call):
        prefix = call.options["prefix"]
        if prefix is None:
            raise OptionError("method 'prefix_lm' needs prefix=P: an int >= 0 or a (B,) integer tensor of "
                              "per-batch prefix lengths (keys j < P are seen by every query).")
        if isinstance(prefix, torch.Tensor) and prefix.device != call.device:
            raise OptionError(f"method 'prefix_lm': prefix is on {prefix.device} but the query is on "
                              f"{call.device}; move it with prefix.to(query.device).")
        return prefix_lm(prefix)

    def bench_options(self, q_len, k_len, density=None):
        """A prefix of a quarter of the keys."""
        if density is not None:
            return super().bench_options(q_len, k_len, density)
        return {"prefix": k_len // 4}

    def sample_options(self, rng, q_len, k_len):
        return {"prefix": int(rng.integers(0, k_len + 3)), "block_size": int(rng.choice([16, 32]))}
