"""``kinetics``: block top-k attention for decoding (Sadhukhan et al. 2025, Kinetics,
arXiv 2506.05333).

Sinks, a local window, and the top-k chunks of the rest, scored by the query's mean logit over
each chunk. For query i at bottom-right position ``a = i + Lk - Lq``, with ``N = a + 1`` keys
visible (sink ``S``, local ``W``, chunk ``C``, budget ``K`` chunks; batch b, kv head g with its
``r = H / Hkv`` query heads)::

    dense row            if N <= ceil((S + W + K*C) / C) * C
    dynamic keys         [S, S + M*C),   M = (N - W - S) // C chunks, chunk m = [S + m*C, S + (m+1)*C)
    chunk score          σ[g, m] = mean_{h in g} mean_{j in chunk m} q_h · k_j · scale
                                 = (mean_h q_h) · (mean_j k_j) · scale
    kept                 [0, S)  ∪  top-K chunks by σ (shared by the kv head's query heads)  ∪  [S + M*C, N)
    out                  softmax(q kᵀ · scale, masked by kept) v            (exact, one softmax)

(the local window widens to ``N - S - M*C >= W`` keys so the dynamic part is whole chunks).
``density`` replaces ``top_k``: query i keeps ``ceil(density * M)`` of its ``M`` dynamic chunks
(a row with ``M <= 0`` is dense), so ``density=1`` is dense causal attention.

Kinetics is a decoding method: each query is scored alone, so a multi-token call applies the
decode rule to every row with ``N = a + 1``, and stepping one token at a time through
``ak.nn.Attention``'s key/value cache equals the full forward (``decode=True``). The official
system runs the prompt (prefill) densely and uses the rule only while decoding; to reproduce that,
run the prompt with ``method="dense"``.

Confirmed in Infini-AI-Lab/Kinetics @ af7fa57 ``LiteSys/litesys/attention/sparsity_utils.py``
(``blockwise_topk_sparsity``): ``n_full`` rounded up to a multiple of the block size, dynamic
part ``(seq_len - local - sink) // block_size * block_size``, local widened to the rest, logits
averaged over the query group then over each block, ``topk`` per kv head, applied to every query
head of the group, sinks default 4 and ``attn_block_size`` default 16; ``batch_cache.py``: the
logits come from the cache after appending the new token (``N`` counts it) and prefill is dense;
``benchmark/blocktopk_decoder.py``: ``topk_page=64`` pages of 16 (attnkit's ``top_k`` default).
``local`` has no official default (each experiment sets ``attn_local``); attnkit uses one chunk.
"""

from __future__ import annotations

import torch

from ...call import CAUSAL_PATTERNS
from ...options import Option
from ...patterns.interval import Full
from ...patterns.plan import cdiv
from ...patterns.selection import BlockSelection
from ...registry import MethodInfo, options, register
from ..pattern_method import BLOCK_SIZE
from .base import (PER_QUERY_BACKENDS, DynamicMethod, budget_from_density, by_query_head, density_option,
                   key_means, resolve_budget, rows_per_chunk, top_k_mask)

DEFAULT_TOP_K = 64


@register
class Kinetics(DynamicMethod):
    info = MethodInfo(
        name="kinetics", family="D", kind="exact", patterns=CAUSAL_PATTERNS, decode=True, seed=(34,),
        summary="Kinetics block top-k: sinks + local window + top-k chunks by mean logit (decoding)",
        backends=PER_QUERY_BACKENDS,
        options=options(
            Option("chunk_size", "int", 16, "keys per scored chunk (attn_block_size)", low=1),
            Option("top_k", "int", None, f"dynamic chunks kept per query and kv head (topk_block; default "
                   f"{DEFAULT_TOP_K})", low=1, nullable=True),
            Option("sink", "int", 4, "first keys always kept (attention sinks)", low=0),
            Option("local", "int", 16, "last keys always kept (widened to whole chunks; attn_local)", low=0),
            density_option("each query's dynamic chunks"),
            BLOCK_SIZE),
        references="Sadhukhan et al. 2025, Kinetics (arXiv 2506.05333); github.com/Infini-AI-Lab/Kinetics "
                   "LiteSys/litesys/attention/sparsity_utils.py")

    def check_options(self, call):
        resolve_budget(self.info.name, call.options, "top_k", DEFAULT_TOP_K)

    def select(self, call):
        o = call.options
        rule, budget = resolve_budget(self.info.name, o, "top_k", DEFAULT_TOP_K)
        C, S, W = o["chunk_size"], o["sink"], o["local"]
        shift = (-S) % C
        first = (S + shift) // C  # index of the chunk that starts at key S
        means = key_means(call.key.detach(), C, shift)  # (B, Hk, nK, D)
        B, Hk, n_chunks = call.batch, call.kv_heads, means.shape[2]
        q = call.query.detach().to(means.dtype)
        q_group = q.reshape(B, Hk, call.group, call.q_len, -1).mean(2)  # mean query of each kv head
        chunks = torch.arange(n_chunks, device=call.device)
        tiles = torch.zeros(B, Hk, call.q_len, n_chunks, dtype=torch.bool, device=call.device)
        step = rows_per_chunk(B * Hk * n_chunks, call.device)
        for r0 in range(0, call.q_len, step):
            r1 = min(call.q_len, r0 + step)
            n = torch.arange(r0, r1, device=call.device) + call.causal_offset + 1  # keys visible: N
            m = torch.div(n - W - S, C, rounding_mode="floor").clamp(min=0)  # dynamic chunks: M
            if rule == "density":
                keep_k = budget_from_density(budget, m)
                dense = keep_k >= m
            else:
                keep_k = torch.full_like(m, budget)
                dense = n <= cdiv(S + W + budget * C, C) * C
            score = (q_group[:, :, r0:r1] @ means.transpose(-1, -2)) * call.scale  # (B, Hk, R, nK)
            dynamic = (chunks >= first) & (chunks < first + m[:, None])
            keep = top_k_mask(score.masked_fill(~dynamic, float("-inf")), keep_k)
            tiles[:, :, r0:r1] = keep | ~dynamic | dense[:, None]
        tiles = by_query_head(tiles, call.group)
        pattern = BlockSelection(tiles, 1, C, key_shift=shift) & Full(causal=True)
        return self.selection(call, pattern, details={"chunk_size": C, "key_shift": shift, "tiles": tiles})

    def bench_options(self, q_len, k_len, density=None):
        """Paper defaults scaled to the length; ``density`` (a share of all Lq x Lk pairs, of which
        causal attention sees about half) becomes this method's candidate share ``2 * density``."""
        opts: dict = {}
        if density is not None:
            opts["density"] = min(1.0, 2 * density)
        return opts

    def sample_options(self, rng, q_len, k_len):
        opts = {"chunk_size": int(rng.integers(1, 9)), "sink": int(rng.integers(0, 5)),
                "local": int(rng.integers(0, 9))}
        if rng.random() < 0.5:
            opts["density"] = float(rng.choice([0.1, 0.3, 0.5, 1.0]))
        else:
            opts["top_k"] = int(rng.integers(1, 5))
        return opts


__all__ = ["Kinetics"]
