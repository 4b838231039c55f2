"""``s2``: S2-Attention heterogeneous context sharding (Lin et al. 2024, arXiv 2407.17678; official
code linxihui/dkernel). Per-head local + strided block shards whose union over heads covers the
context; the pattern, the GQA rule (one pattern per kv head) and what was confirmed in the official
code are documented in :mod:`attnkit.patterns.strided`. Runs on the mask engines with an analytic,
exact per-head block plan.
"""

from __future__ import annotations

from ...call import ALL_PATTERNS
from ...options import Option
from ...patterns.strided import VERT_POSITIONS, s2
from ...registry import MethodInfo, options, register
from ..pattern_method import BLOCK_SIZE, MASK_BACKENDS, PatternMethod


@register
class S2Method(PatternMethod):
    info = MethodInfo(
        name="s2", family="P", kind="exact", patterns=ALL_PATTERNS, decode=True, seed=(12,),
        summary="S2-Attention: per-head local + strided block shards covering the context together",
        backends=MASK_BACKENDS, accepts_mask=True,
        options=options(
            Option("sparse_block_size", "int", 64, "S2 block in tokens (changes the pattern; the official "
                   "kernel wants a power of 2 >= 16)", low=1),
            Option("local_blocks", "ints", 16, "local band in blocks incl. the current one: int (causal: "
                   "left; noncausal: each side) or (left, right)", low=1),
            Option("vert_stride", "int", 8, "keep one distant block in every vert_stride (1 = dense)", low=1),
            Option("homo_head", "bool", False, "every head uses head 0's shard"),
            Option("num_dense_heads", "int", 0, "the last kv heads that are dense", low=0),
            Option("head_sliding_step", "int", None, "residue step between kv heads (None: "
                   "max(1, int(vert_stride / heads)))", low=1, nullable=True),
            Option("head_sliding_offset", "int", 0, "residue of kv head 0", low=0),
            Option("vert_position_type", "choice", None, "vertical blocks by absolute block index or by "
                   "distance (None: absolute if causal, relative otherwise)", choices=VERT_POSITIONS,
                   nullable=True),
            BLOCK_SIZE),
        references="Lin et al. 2024, arXiv 2407.17678; github.com/linxihui/dkernel dkernel/utils.py")

    def build_pattern(self, call):
        o = call.options
        return s2(call.heads, kv_heads=call.kv_heads, sparse_block_size=o["sparse_block_size"],
                  local_blocks=o["local_blocks"], vert_stride=o["vert_stride"], causal=call.is_causal,
                  homo_head=o["homo_head"], num_dense_heads=o["num_dense_heads"],
                  head_sliding_step=o["head_sliding_step"], head_sliding_offset=o["head_sliding_offset"],
                  vert_position_type=o["vert_position_type"])

    def bench_options(self, q_len, k_len, density=None):
        """Blocks scaled to the length (L/64, at least 16 tokens): 4 local blocks, vertical stride 8."""
        if density is not None:
            return super().bench_options(q_len, k_len, density)
        return {"sparse_block_size": max(16, k_len // 64), "local_blocks": 4, "vert_stride": 8}

    def sample_options(self, rng, q_len, k_len):
        local = int(rng.integers(1, 4))
        homo = bool(rng.random() < 0.2)
        return {"sparse_block_size": int(rng.integers(1, 9)),
                "local_blocks": local if rng.random() < 0.7 else (local, int(rng.integers(1, 4))),
                "vert_stride": int(rng.integers(1, 6)), "homo_head": homo,
                "num_dense_heads": 0 if homo else int(rng.integers(0, 2)),
                "head_sliding_step": None if rng.random() < 0.6 else int(rng.integers(1, 4)),
                "head_sliding_offset": int(rng.integers(0, 5)),
                "vert_position_type": [None, "absolute", "relative"][int(rng.integers(0, 3))],
                "block_size": int(rng.choice([16, 32]))}
