"""``hip``: Hierarchically Pruned attention, training-free top-k tree search (Lee et al. 2024,
HiP, arXiv 2406.09827).

Queries are cut into blocks of ``query_chunk`` rows, keys into chunks of ``key_chunk``. For
query block r whose last row sits at bottom-right position ``p`` (batch b, query head h, its kv
head's keys)::

    search range       keys [0, T),  T = max(0, p + 1 - window);  NB = ceil(T / key_chunk) chunks
    representatives    rows 1, 1 + s, 1 + 2s, ... of the block (s = query_stride; the row itself
                       when the block has one row)
    chunk score        σ[c] = max_{q in reps, t in chunk c, t <= p} q · k_t            (raw dot product)
    tree search        n = budget / key_chunk branches (rounded up) split [0, NB) evenly:
                       branch i = [floor(NB i / n), floor(NB (i+1) / n)); while the group size
                       NB / n (halved each round) exceeds 1: split every branch (s, g) into
                       (s, g // 2) and (s + g // 2, g - g // 2), score each non-empty child by
                       its FIRST chunk σ[start], keep the n best children
    kept               the n final single chunks (all NB chunks if n >= NB)
    M[i, j]            (chunk(j) kept  ∨  j > p - window)  ∧  j <= a_i
    out                softmax(q kᵀ · scale, masked by M) v                   (exact, one softmax)

``density`` replaces ``budget``: block r keeps ``n = ceil(density * NB)`` of its ``NB`` chunks,
so ``density=1`` is dense causal attention.

Causality and decoding. The default ``query_chunk=1`` scores every query alone: the method is
causal and stepping one token at a time through ``ak.nn.Attention``'s key/value cache equals the
full forward (``decode=True``; HiP v1.0 also clamps the query block to one row when decoding).
``query_chunk=32`` is the paper's prefill setting: a block shares one selection computed from its
representatives, so a query's key set depends on LATER queries of its block (a look-ahead inside
the block, as in the official kernel) — fine for inference prefill, not for causal training or
teacher-forced evaluation, and not equal to token-by-token decoding.

Confirmed in DeepAuto-AI/hip-attention @ fea42c7 ``src/hip_attn/v1_1/attention2_draft.py``
(``masking_iteration_draft_numba_kernel``, with ``block_size_k_group=1``, ``oracle_rep=False``,
one sifter): ``TSRC = keys up to the block's last query - sliding_window_size``, select everything
when ``TSRC <= mask_k``, the even initial split, the split ``right = start + int(size * 0.5)``,
children scored by ``max(q[1::2] @ k[first chunk].T)``, empty children ``-32000``, top
``mask_k // block_size_k`` by argsort, ``while group_size > 1`` with ``group_size`` halved;
``src/hip_attn/v1_0/attention1_block_gpu.py`` (``hip_attention``) defaults ``mask_k=512,
block_size_q=32, block_size_k=2, reduce_stride=2, sliding_window_size=128`` and the decode clamp
``block_size_q = min(block_size_q, next_power_of_2(T_DST))``;
``v1_0/attention1_block_gpu_kernel/calc_prob_return_context.py``: the sliding window is the last
``sliding_window_size`` keys before each query BLOCK's end (``tsrc - SLIDING_WINDOW_SIZE``), causal.
Differences: the initial split uses exact integer division (official: ``int(BSRC / n * i)`` in
floats); empty children score ``-inf``; representatives of a one-row block are that row (the draft
would index an empty ``q[1::2]``); v1.0's extra heuristics (first queries dense, SparQ, random
representative sampling, sinks) and the multi-sifter variants are not reproduced. attnkit scores
every chunk once (one batched matmul over chunks of query blocks, ``O(Lq Lk D / query_chunk)``)
and runs the tree search on that table: the same selection as the official kernel, which scores
only the children it visits (``O(T log T)``), so selection times here are not the paper's.
"""

from __future__ import annotations

import torch

from ...call import CAUSAL_PATTERNS
from ...options import Option
from ...patterns.interval import Full
from ...patterns.plan import cdiv
from ...patterns.selection import BlockSelection, BlockWindow
from ...registry import MethodInfo, options, register
from ..pattern_method import BLOCK_SIZE, MASK_BACKENDS
from .base import (DynamicMethod, budget_from_density, by_query_head, density_option, resolve_budget,
                   rows_per_chunk, work_dtype)

DEFAULT_BUDGET = 512


@register
class HiP(DynamicMethod):
    info = MethodInfo(
        name="hip", family="D", kind="exact", patterns=CAUSAL_PATTERNS, decode=True, seed=(13,),
        summary="HiP: hierarchical top-k tree search over key chunks + a sliding window (training-free)",
        backends=MASK_BACKENDS,
        options=options(
            Option("budget", "int", None, f"keys the tree search selects per query block (mask_k; default "
                   f"{DEFAULT_BUDGET})", low=1, nullable=True),
            Option("query_chunk", "int", 1, "queries sharing one selection (block_size_q; the paper's prefill "
                   "uses 32, which looks ahead within a block)", low=1),
            Option("key_chunk", "int", 2, "keys per selectable chunk (block_size_k)", low=1),
            Option("window", "int", 128, "last keys before each query block always kept "
                   "(sliding_window_size)", low=0),
            Option("query_stride", "int", 2, "stride of the representative queries of a block, from its "
                   "second row (reduce_stride)", low=1),
            density_option("each query block's key chunks in its search range"),
            BLOCK_SIZE),
        references="Lee et al. 2024, HiP (arXiv 2406.09827); github.com/DeepAuto-AI/hip-attention "
                   "src/hip_attn/v1_1/attention2_draft.py")

    def check_options(self, call):
        resolve_budget(self.info.name, call.options, "budget", DEFAULT_BUDGET)

    def select(self, call):
        o = call.options
        rule, budget = resolve_budget(self.info.name, o, "budget", DEFAULT_BUDGET)
        bq, bk, window, stride = o["query_chunk"], o["key_chunk"], o["window"], o["query_stride"]
        dev = call.device
        n_qb, n_kc = cdiv(call.q_len, bq), cdiv(call.k_len, bk)
        last = torch.clamp((torch.arange(n_qb, device=dev) + 1) * bq, max=call.q_len) - 1 + call.causal_offset
        search = torch.clamp(last + 1 - window, min=0)  # T per query block
        n_chunks = torch.div(search + bk - 1, bk, rounding_mode="floor")  # NB
        if rule == "density":
            branches = budget_from_density(budget, n_chunks)
        else:
            branches = torch.minimum(torch.full_like(n_chunks, cdiv(budget, bk)), n_chunks)
        q = call.query.detach()
        k = by_query_head(call.key.detach(), call.group).to(work_dtype(q))
        B, H = call.batch, call.heads
        tiles = torch.zeros(B, H, n_qb, n_kc, dtype=torch.bool, device=dev)
        reps = _representatives(bq, stride, call.q_len, dev)  # (nQb, nR) rows, -1 = none
        step = rows_per_chunk(2 * B * H * reps.shape[1] * call.k_len, dev)  # two score tensors live at once
        for r0 in range(0, n_qb, step):
            r1 = min(n_qb, r0 + step)
            score = _chunk_scores(q, k, reps[r0:r1], last[r0:r1], bk, n_kc)  # (B, H, R, nKc)
            tiles[:, :, r0:r1] = _tree_search(score, n_chunks[r0:r1], branches[r0:r1])
        pattern = (BlockSelection(tiles, bq, bk) | BlockWindow(window, bq)) & Full(causal=True)
        return self.selection(call, pattern, details={"tiles": tiles, "branches": branches,
                                                      "search_chunks": n_chunks})

    def bench_options(self, q_len, k_len, density=None):
        """Paper defaults scaled to the length; ``density`` (a share of all Lq x Lk pairs, of which
        causal attention sees about half) becomes this method's candidate share ``2 * density``."""
        opts = dict({"window": max(16, k_len // 32)})
        if density is not None:
            opts["density"] = min(1.0, 2 * density)
        return opts

    def sample_options(self, rng, q_len, k_len):
        # query_chunk stays 1: larger query chunks look ahead within a block (see the docstring),
        # which the generic causal tests rightly reject; tests/test_dynamic.py covers them
        opts = {"key_chunk": int(rng.integers(1, 5)), "window": int(rng.integers(0, 9)),
                "query_stride": int(rng.integers(1, 4))}
        if rng.random() < 0.5:
            opts["density"] = float(rng.choice([0.1, 0.3, 0.5, 1.0]))
        else:
            opts["budget"] = int(rng.integers(1, 13))
        return opts


def _representatives(block_q: int, stride: int, q_len: int, device) -> torch.Tensor:
    """Rows of each query block that score the chunks ``(nQb, nR)``: offsets 1, 1+s, ... in the
    block; a block of one row uses that row; -1 pads."""
    n_qb = cdiv(q_len, block_q)
    offs = torch.arange(1, block_q, stride, device=device)
    if block_q == 1:
        offs = torch.zeros(1, dtype=torch.long, device=device)
    rows = torch.arange(n_qb, device=device)[:, None] * block_q + offs
    start = torch.arange(n_qb, device=device) * block_q
    rows = torch.where(rows < q_len, rows, -1)
    alone = (rows < 0).all(-1)  # a block with one row: that row represents it
    rows[:, 0] = torch.where(alone, start, rows[:, 0])
    return rows


def _chunk_scores(q, k, reps, last, bk, n_kc):
    """``σ[b, h, r, c] = max`` over the block's representatives and the keys of chunk c that are
    visible to the block's last query; ``-inf`` where no key of the chunk is visible."""
    B, H, L, D = k.shape
    rows = reps.clamp(min=0)
    qr = q[:, :, rows.reshape(-1)].to(k.dtype)  # (B, H, R * nR, D)
    s = (qr @ k.transpose(-1, -2)).view(B, H, *reps.shape, L)  # (B, H, R, nR, Lk)
    s = s.masked_fill((reps < 0)[..., None], float("-inf")).amax(3)
    s = s.masked_fill(torch.arange(L, device=k.device) > last[:, None], float("-inf"))
    s = torch.nn.functional.pad(s, (0, n_kc * bk - L), value=float("-inf"))
    return s.view(B, H, -1, n_kc, bk).amax(-1)


def _tree_search(score: torch.Tensor, n_chunks: torch.Tensor, branches: torch.Tensor) -> torch.Tensor:
    """Kept chunks ``(B, H, R, nKc)`` of the hierarchical top-k search on a score table (see the
    module docstring); ``n_chunks`` (NB) and ``branches`` (n) are per row ``(R,)``."""
    dev = score.device
    n_max = int(branches.max()) if branches.numel() else 0
    if n_max == 0:
        return torch.zeros(score.shape, dtype=torch.bool, device=dev)
    nb, n = n_chunks[:, None], branches[:, None].clamp(min=1)
    slot = torch.arange(n_max, device=dev)
    start = (nb * slot) // n
    size = (nb * (slot + 1)) // n - start
    valid = slot < branches[:, None]
    shape = (*score.shape[:-1], n_max)
    start, size, valid = start.expand(shape), size.expand(shape), valid.expand(shape)
    ratio = max((c / b for c, b in zip(n_chunks.tolist(), branches.tolist()) if b > 0), default=1.0)
    while ratio > 1:  # the official loop: group_size = NB / n, halved until <= 1
        mid = start + size // 2
        c_start = torch.cat([start, mid], -1)
        c_size = torch.cat([mid - start, start + size - mid], -1)
        c_ok = torch.cat([valid, valid], -1) & (c_size >= 1)
        c_score = torch.gather(score, -1, c_start.clamp(max=score.shape[-1] - 1))
        c_score = c_score.masked_fill(~c_ok, float("-inf"))
        best, order = c_score.topk(n_max, dim=-1)
        start, size = torch.gather(c_start, -1, order), torch.gather(c_size, -1, order)
        valid = (slot < branches[:, None]) & (best > float("-inf"))
        ratio /= 2
    slots = torch.where(valid, start, score.shape[-1])  # invalid slots go to a spare column
    kept = torch.zeros((*score.shape[:-1], score.shape[-1] + 1), dtype=torch.bool, device=dev)
    return kept.scatter(-1, slots, True)[..., :-1]


__all__ = ["HiP"]
