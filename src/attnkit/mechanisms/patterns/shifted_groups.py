"""``shifted_groups``: LongLoRA S²-Attn (Chen et al. 2023, arXiv 2309.12307): attention within groups
of ``G`` tokens, the last ``H // 2`` heads' groups shifted by ``G // 2``. Variants ``no_wrap`` (the
official flash path) and ``roll`` (the original cyclic shift); both are read from the official code
and documented in :mod:`attnkit.patterns.shifted`, with why ``roll`` cannot run as causal attention.
Self-attention, and causal cross-attention with an explicit ``group_size`` (KV cache / decoding).
"""

from __future__ import annotations

from ...call import pattern_name
from ...errors import OptionError
from ...options import Option
from ...patterns.shifted import VARIANTS, shifted_groups
from ...registry import MethodInfo, options, register
from ..pattern_method import BLOCK_SIZE, MASK_BACKENDS, PatternMethod

GROUP_SIZE = Option("group_size", "int", None, "group length G in tokens (None: group_size_ratio of the "
                    "length; self-attention only)", low=1, nullable=True)
GROUP_RATIO = Option("group_size_ratio", "float", 0.25, "G = int(L * ratio) when group_size is None "
                     "(official 1/4)", low=0.0, high=1.0, open_low=True)
GROUP_PATTERNS = frozenset({pattern_name(False, True), pattern_name(True, True), pattern_name(True, False)})


@register
class ShiftedGroupsMethod(PatternMethod):
    info = MethodInfo(
        name="shifted_groups", family="P", kind="exact", patterns=GROUP_PATTERNS, decode=True, seed=(49,),
        summary="LongLoRA S2-Attn: group attention, half the heads shifted by half a group",
        backends=MASK_BACKENDS, accepts_mask=True,
        options=options(GROUP_SIZE, GROUP_RATIO,
                        Option("variant", "choice", "no_wrap", "no_wrap (flash path: groups cut at G/2, "
                               "nothing wraps) or roll (cyclic shift; noncausal only)", choices=VARIANTS),
                        BLOCK_SIZE),
        references="Chen et al. 2023, arXiv 2309.12307; github.com/dvlab-research/LongLoRA llama_attn_replace.py")

    def build_pattern(self, call):
        o = call.options
        if o["variant"] == "roll" and call.is_causal:
            raise OptionError(
                "method 'shifted_groups': variant='roll' with is_causal=True is invalid: the official roll "
                "path is causal in rolled positions, so its first G/2 tokens see the last G/2 keys "
                "(future tokens). Use variant='no_wrap' (the official flash path), or reproduce the "
                "official training mask with pattern=ak.patterns.shifted_groups(G, heads=H, "
                "variant='roll', causal=True) and is_causal=False.")
        return shifted_groups(o["group_size"], heads=call.heads, group_size_ratio=o["group_size_ratio"],
                              variant=o["variant"], causal=call.is_causal)

    def bench_options(self, q_len, k_len, density=None):
        """Groups of a quarter of the keys (LongLoRA's ratio), or ``density * Lk`` keys."""
        group = k_len // 4 if density is None else max(1, round(density * k_len))
        return {"group_size": max(1, group)}

    def sample_options(self, rng, q_len, k_len):
        return {"group_size": int(rng.integers(1, max(2, k_len + 3))),
                "group_size_ratio": float(rng.uniform(0.05, 1.0)),
                "block_size": int(rng.choice([16, 32]))}
