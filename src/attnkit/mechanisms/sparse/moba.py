"""``moba``: Mixture of Block Attention, the parameter-free block router (Lu et al. 2025,
arXiv 2502.13189).

Keys are cut into chunks of ``chunk_size`` (``Bc``). For query ``i`` at bottom-right position
``a = i + Lk - Lq`` (batch b, query head h, its kv head's keys under GQA)::

    mean key   k̄_c    = mean of the keys of chunk c                       (float32 / float64)
    gate       g[i, c] = q_i · k̄_c                                         (no softmax scale)
    own chunk  c_i     = a // Bc                                            (always kept)
    candidates         = complete past chunks c < c_i
    kept               = {c_i} ∪ top-(top_k - 1) candidates by g            (all if fewer)
    M[i, j]            = chunk(j) kept  ∧  j <= a
    out                = softmax(q kᵀ · scale, masked by M) v               (exact, one softmax)

``density`` replaces ``top_k``: query i keeps ``ceil(density * (c_i + 1))`` of its ``c_i + 1``
visible chunks (its own included), so ``density=1`` is dense causal attention.

Routing is per query and reads only ``q_i`` and chunks that end before it, so the method is
causal and decoding one token at a time through ``ak.nn.Attention``'s key/value cache equals the
full forward (``decode=True``; a decode step is the bottom-right causal-cross call).

Confirmed in MoonshotAI/MoBA @ 61e456b ``moba/moba_naive.py`` (``moba_attn_varlen_naive``):
mean keys per chunk (partial last chunk averaged over its own keys), gate = float32 einsum of q
and mean keys without scale, gate ``-inf`` for chunks that do not end before the query and
``+inf`` for its own chunk, ``topk(min(moba_topk, num_block))``, kept = the top-k index set
(ties resolved by that set), causal mask applied after; ``moba/moba_efficient.py``: ``moba_topk - 1``
past chunks plus the current one (the last chunk never routed), LSE merge of the two parts — the
same result as one masked softmax. Defaults ``moba_chunk_size=4096, moba_topk=12`` from the README /
``examples/llama.py``. Differences: the official code takes the chunk mean in the key's dtype
before casting to float32 (here: accumulated in float32); it assumes ``H == Hkv`` (here: each
query head routes with its kv head's mean keys); it runs only causal self-attention (here also
the bottom-right causal-cross call that decoding makes). The paper recommends continued training
with MoBA; as a drop-in on a pretrained model it is an approximation of dense attention.
"""

from __future__ import annotations

import torch

from ...call import CAUSAL_PATTERNS
from ...options import Option
from ...patterns.interval import Full
from ...patterns.selection import BlockSelection
from ...registry import MethodInfo, options, register
from ..pattern_method import BLOCK_SIZE
from .base import (PER_QUERY_BACKENDS, DynamicMethod, budget_from_density, by_query_head, density_option,
                   key_means, resolve_budget, rows_per_chunk, top_k_mask)

DEFAULT_TOP_K = 12


@register
class MoBA(DynamicMethod):
    info = MethodInfo(
        name="moba", family="D", kind="exact", patterns=CAUSAL_PATTERNS, decode=True, seed=(2, 37),
        summary="MoBA: each query attends its own chunk + the top-k past chunks by q·mean(key)",
        backends=PER_QUERY_BACKENDS,
        options=options(
            Option("chunk_size", "int", 4096, "keys per chunk (the paper's block; moba_chunk_size)", low=1),
            Option("top_k", "int", None, f"chunks each query attends, its own included (moba_topk; "
                   f"default {DEFAULT_TOP_K})", low=1, nullable=True),
            density_option("each query's visible chunks (its own + the complete past ones)"),
            BLOCK_SIZE),
        references="Lu et al. 2025, MoBA (arXiv 2502.13189); github.com/MoonshotAI/MoBA moba/moba_naive.py")

    def check_options(self, call):
        resolve_budget(self.info.name, call.options, "top_k", DEFAULT_TOP_K)

    def select(self, call):
        rule, budget = resolve_budget(self.info.name, call.options, "top_k", DEFAULT_TOP_K)
        chunk = call.options["chunk_size"]
        q = call.query.detach()
        means = by_query_head(key_means(call.key.detach(), chunk), call.group)  # (B, H, nC, D)
        B, H, n_chunks = call.batch, call.heads, means.shape[2]
        chunks = torch.arange(n_chunks, device=call.device)
        tiles = torch.zeros(B, H, call.q_len, n_chunks, dtype=torch.bool, device=call.device)
        step = rows_per_chunk(B * H * n_chunks, call.device)
        for r0 in range(0, call.q_len, step):
            r1 = min(call.q_len, r0 + step)
            own = torch.div(torch.arange(r0, r1, device=call.device) + call.causal_offset, chunk,
                            rounding_mode="floor")  # (R,), negative: the query sees no key
            gate = q[:, :, r0:r1].to(means.dtype) @ means.transpose(-1, -2)  # (B, H, R, nC)
            gate = gate.masked_fill(chunks >= own[:, None], float("-inf"))
            if rule == "density":
                others = budget_from_density(budget, (own + 1).clamp(min=0)) - 1
            else:
                others = torch.full_like(own, budget - 1)
            keep = top_k_mask(gate, others.clamp(min=0))
            tiles[:, :, r0:r1] = keep | ((chunks == own[:, None]) & (own[:, None] >= 0))
        pattern = BlockSelection(tiles, 1, chunk) & Full(causal=True)
        return self.selection(call, pattern, details={"chunk_size": chunk, "tiles": tiles,
                                                      "kept_chunks": tiles.sum(-1)})

    def bench_options(self, q_len, k_len, density=None):
        """Paper defaults scaled to the length; ``density`` (a share of all Lq x Lk pairs, of which
        causal attention sees about half) becomes this method's candidate share ``2 * density``."""
        opts = dict({"chunk_size": max(16, k_len // 16), **({} if density is not None else {"top_k": 3})})
        if density is not None:
            opts["density"] = min(1.0, 2 * density)
        return opts

    def sample_options(self, rng, q_len, k_len):
        opts = {"chunk_size": int(rng.integers(1, 13))}
        if rng.random() < 0.5:
            opts["density"] = float(rng.choice([0.1, 0.3, 0.5, 1.0]))
        else:
            opts["top_k"] = int(rng.integers(1, 5))
        return opts


__all__ = ["MoBA"]
