"""``sink_groups``: SinkLoRA SF-Attn (Zhang 2024, arXiv 2406.05678): LongLoRA's shifted groups with the
shifted groups kept in place (no wrap) plus the first ``sinks`` keys visible to every query. The
official repository has no SF-Attn code: this is reconstructed from the paper's abstract, as the
spec says; see :mod:`attnkit.patterns.shifted` for what is and is not verified.
"""

from __future__ import annotations

from ...options import Option
from ...patterns.shifted import sink_groups
from ...registry import MethodInfo, options, register
from ..pattern_method import BLOCK_SIZE, MASK_BACKENDS, PatternMethod
from .shifted_groups import GROUP_PATTERNS, GROUP_RATIO, GROUP_SIZE


@register
class SinkGroupsMethod(PatternMethod):
    info = MethodInfo(
        name="sink_groups", family="P", kind="exact", patterns=GROUP_PATTERNS, decode=True, seed=(49,),
        summary="SinkLoRA SF-Attn (reconstructed): no-wrap shifted groups + sink tokens seen by all",
        backends=MASK_BACKENDS, accepts_mask=True,
        options=options(GROUP_SIZE, GROUP_RATIO,
                        Option("sinks", "int", 4, "first keys every query sees (sink attention tokens)", low=0),
                        BLOCK_SIZE),
        references="Zhang 2024, arXiv 2406.05678 (no SF-Attn code in github.com/Dexter-GT-86/SinkLoRA)")

    def build_pattern(self, call):
        o = call.options
        return sink_groups(o["group_size"], heads=call.heads, sinks=o["sinks"],
                           group_size_ratio=o["group_size_ratio"], causal=call.is_causal)

    def bench_options(self, q_len, k_len, density=None):
        """Groups of a quarter of the keys (LongLoRA's ratio), or ``density * Lk`` keys."""
        group = k_len // 4 if density is None else max(1, round(density * k_len))
        return {"group_size": max(1, group)}

    def sample_options(self, rng, q_len, k_len):
        return {"group_size": int(rng.integers(1, max(2, k_len + 3))),
                "sinks": int(rng.integers(0, 6)), "block_size": int(rng.choice([16, 32]))}
