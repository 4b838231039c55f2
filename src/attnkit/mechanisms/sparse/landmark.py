"""``landmark``: Landmark Attention — a landmark token closes every block; a grouped softmax lets
its score stand for its block, and at inference a query retrieves the top-k blocks by landmark
score (Mohtashami & Jaggi 2023, arXiv 2305.16300).

The sequence holds landmark tokens: with blocks of ``P = block`` positions (the paper's
``mem_freq + 1``), position p is a landmark iff ``(p + 1) % P == 0`` (the caller inserted them;
:class:`LandmarkTokens` does it with a learned embedding). For ``q (B, H, Lq, D)``,
``k (B, Hkv, Lk, D)``, ``v (B, Hkv, Lk, Dv)``, causal, query i at bottom-right position
``a = i + Lk - Lq``, ``cur = a // P``, ``s_j = q_i · k_j · scale``::

    current group  G  = regular tokens j of block cur with j <= a  ∪  landmarks of the kept past blocks
    kept           all past blocks b < cur (top_k=None: the training formula), or the top_k by the
                   landmark score s_lm(b) (the inference retrieval; density: ceil(density * cur))
    block groups   G_b = the regular tokens of kept block b
    weights        w_ij = softmax_G(s)_j                        for j a current-block token
                   w_ij = softmax_G(s)_lm(b) · softmax_{G_b}(s)_j  for j in G_b
                   landmark columns 0 (their values are never read); rows sum to 1
    out_i          = Σ_j w_ij v_j

Kind ``approximate``: the grouped softmax is not dense attention (equal to it only for sequences
shorter than one block). Its fast forms (``gather``, ``dense``) are the two-level attention of
:mod:`._two_level` — a landmark's mass times an exact softmax inside its block, the current block's
tokens merged in by their log-sum-exp; "exact once the selection is made" means each kept block's
inner softmax is exact. The retrieval step (``ak.explain(...).plan``, a ``GroupPlan``) is the
exported selection. Retrieval is per query head and reads only the query and earlier landmarks,
so decoding through ``ak.nn.Attention``'s key/value cache equals the forward.

Confirmed in epfml/landmark-attention @ d963e50 ``llama/llama_mem.py``:
``landmark_grouped_softmax`` / ``LandmarkGroupedSoftmaxFunction`` (group ids = cumsum of
``is_mem``; landmarks and the last section share one group; each block's tokens are
normalised within their group and scaled by their landmark's probability; the current block's own
landmark masked by ``LlamaModel.forward``'s ``last_section_mask``), and ``LlamaAttention.forward``'s
cache path (memory = the complete blocks of the cache, landmark scores ``q · k_lm / sqrt(d)`` per
query token and head, ``topk(cache_top_k)``, then the grouped softmax over the retrieved blocks
plus the current incomplete block); ``llama/run_test.py`` (``cache_top_k = 5``) and the README's
``mem_freq = 63`` (64-token blocks). Differences: the official training path caps groups at
``max_mem_cnt = 64`` (block ids >= 63 collide; here no cap); at inference the official code
re-assigns RoPE positions to retrieved blocks (placing them just before the current block) —
that cannot be done on already-rotated keys, so here every key keeps its own position; the
official prefill runs the first window with every block (no retrieval), here ``top_k`` applies to
every query alike.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ...call import CAUSAL_PATTERNS
from ...errors import ShapeError
from ...options import Option
from ...registry import Method, MethodInfo, options, register
from ._two_level import DensePlanEngine, GroupPlan, PlanEngine, gather_outer, top_groups
from .base import budget_from_density, by_query_head, density_option, rows_per_chunk

DEFAULT_BLOCK = 64
RETRIEVAL_TOP_K = 5  # llama/run_test.py's cache_top_k


def budget(method: str, options: dict) -> tuple[str, int | float | None]:
    """``("all", None)``, ``("top_k", k)`` or ``("density", d)``."""
    from ...errors import OptionError

    if options["top_k"] is not None and options["density"] is not None:
        raise OptionError(f"method {method!r}: pass either top_k={options['top_k']} or density={options['density']}, "
                          "not both (top_k counts retrieved blocks, density a fraction of the past blocks).")
    if options["density"] is not None:
        return "density", options["density"]
    if options["top_k"] is not None:
        return "top_k", options["top_k"]
    return "all", None


def is_landmark(positions: torch.Tensor, block: int) -> torch.Tensor:
    """Bool: which key positions are landmark tokens (the last position of every block)."""
    return (positions + 1) % block == 0


@register
class Landmark(Method):
    info = MethodInfo(
        name="landmark", family="D", kind="approximate", seed=(74,), decode=True, patterns=CAUSAL_PATTERNS,
        summary="Landmark Attention: grouped softmax through per-block landmark tokens; top-k block retrieval",
        backends=("gather", "dense"),
        options=options(
            Option("block", "int", DEFAULT_BLOCK, "positions per block, its landmark last (mem_freq + 1)", low=2),
            Option("top_k", "int", None, "past blocks retrieved per query by landmark score (cache_top_k); None: "
                   f"every past block (the training formula; run_test.py retrieves {RETRIEVAL_TOP_K})", low=1,
                   nullable=True),
            density_option("each query's past blocks (retrieved)")),
        references="Mohtashami & Jaggi 2023, Landmark Attention (arXiv 2305.16300); github.com/epfml/"
                   "landmark-attention llama/llama_mem.py")

    def engines(self):
        return (PlanEngine(), DensePlanEngine())

    def validate(self, call):
        budget(self.info.name, call.options)

    def prepare(self, call) -> GroupPlan:
        rule, value = budget(self.info.name, call.options)
        P = call.options["block"]
        wd = torch.float64 if call.dtype == torch.float64 else torch.float32
        q = call.query.to(wd)
        n = call.k_len // P  # blocks whose landmark exists
        lm_keys = by_query_head(call.key[:, :, P - 1::P][:, :, :n].to(wd), call.group)  # (B, H, n, D)
        blocks = torch.arange(n, device=call.device)
        B, H = call.batch, call.heads
        parts_g, parts_o = [], []
        step = rows_per_chunk(B * H * max(n, 1), call.device)
        for r0 in range(0, call.q_len, step):
            r1 = min(call.q_len, r0 + step)
            a = torch.arange(r0, r1, device=call.device) + call.causal_offset
            cur = torch.where(a >= 0, a // P, -1)
            past = cur.clamp(min=0)
            keep = {"all": past, "top_k": past.clamp(max=value or 1),
                    "density": budget_from_density(value or 1.0, past)}[rule]
            qr = q[:, :, r0:r1]
            with torch.no_grad():
                scores = qr @ lm_keys.transpose(-1, -2)
            groups = top_groups(scores, blocks < cur[:, None], keep)
            outer = gather_outer(lambda ids: _landmark_logits(qr, lm_keys, ids) * call.scale, groups)
            groups = torch.cat([groups, cur.expand(B, H, -1)[..., None]], -1)  # the current block, last
            outer = torch.cat([outer, torch.zeros_like(outer[..., :1])], -1)  # replaced by its own lse
            parts_g.append(groups)
            parts_o.append(outer)
        width = max(g.shape[-1] for g in parts_g)
        # the current block stays the last slot: pad before it
        groups = torch.cat([_pad_before_last(g, width, -1) for g in parts_g], 2)
        outer = torch.cat([_pad_before_last(x, width, float("-inf")) for x in parts_o], 2)
        return GroupPlan(groups, outer, P, causal=True, skip_last=True, own_lse_slot=width - 1,
                         details={"blocks": n, "budget": (rule, value)})

    def reference(self, call):
        """Row by row, the grouped softmax of the module docstring (float64): one softmax over the
        current block's tokens and the kept landmarks, one inside each kept block."""
        rule, value = budget(self.info.name, call.options)
        P = call.options["block"]
        q, (k, v) = call.query.to(torch.float64), (t.to(torch.float64) for t in call.expanded_kv())
        B, H, Lk = call.batch, call.heads, call.k_len
        pos = torch.arange(Lk, device=call.device)
        landmark = is_landmark(pos, P)
        out = torch.zeros(B, H, call.q_len, call.value_dim, dtype=torch.float64, device=call.device)
        for i in range(call.q_len):
            a = i + call.causal_offset
            if a < 0:
                continue
            cur = a // P
            s = torch.einsum("bhd,bhjd->bhj", q[:, :, i], k) * call.scale  # (B, H, Lk)
            past = torch.arange(cur, device=call.device)
            lm_score = s[..., past * P + P - 1]  # (B, H, cur)
            count = {"all": cur, "top_k": min(cur, value or 1),
                     "density": min(cur, max(1, math.ceil(cur * (value or 1.0) - 1e-9)))}[rule]
            kept = torch.zeros(B, H, cur, dtype=torch.bool, device=call.device)
            if cur and count:
                kept.scatter_(-1, lm_score.topk(count, dim=-1).indices, True)
            current = (pos // P == cur) & (pos <= a) & ~landmark  # (Lk,)
            big = torch.cat([s[..., current], lm_score.masked_fill(~kept, float("-inf"))], -1)
            p_big = torch.softmax(big, -1)
            n_cur = int(current.sum())
            w = torch.zeros(B, H, Lk, dtype=torch.float64, device=call.device)
            w[..., current] = p_big[..., :n_cur]
            if cur:  # past blocks: landmark probability x softmax over the block's regular tokens
                inner = torch.softmax(s[..., :cur * P].view(B, H, cur, P)[..., :P - 1], -1)
                scaled = p_big[..., n_cur:, None] * inner  # (B, H, cur, P - 1)
                w[..., :cur * P] = torch.nn.functional.pad(scaled, (0, 1)).view(B, H, cur * P)
            out[:, :, i] = torch.einsum("bhj,bhjd->bhd", w, v)
        return out.to(call.dtype)

    def sample_options(self, rng, q_len, k_len):
        opts = {"block": int(rng.integers(2, 9))}
        r = rng.random()
        if r < 0.35:
            opts["top_k"] = int(rng.integers(1, 4))
        elif r < 0.7:
            opts["density"] = float(rng.choice([0.2, 0.5, 1.0]))
        return opts

    def bench_options(self, q_len, k_len, density=None):
        """Blocks of 64 (16 below 1024 keys) and the retrieval of run_test.py (top_k = 5); with
        ``density``, ``top_k = round(density * Lk / block)`` blocks (at least 1)."""
        block = DEFAULT_BLOCK if k_len >= 1024 else 16
        opts = {"top_k": RETRIEVAL_TOP_K} if block == DEFAULT_BLOCK else {"block": block, "top_k": RETRIEVAL_TOP_K}
        if density is not None:
            opts["top_k"] = max(1, round(density * k_len / block))
        return opts


def _landmark_logits(q: torch.Tensor, lm_keys: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    B, H, R, S = ids.shape
    if lm_keys.shape[2] == 0:  # no landmark yet: every slot is unused
        return q.new_zeros(B, H, R, S)
    picked = lm_keys.gather(2, ids.reshape(B, H, R * S, 1).expand(-1, -1, -1, lm_keys.shape[-1]))
    return (picked.view(B, H, R, S, -1) * q[..., None, :]).sum(-1)


def _pad_before_last(t: torch.Tensor, width: int, value) -> torch.Tensor:
    pad = width - t.shape[-1]
    if pad == 0:
        return t
    filler = torch.full((*t.shape[:-1], pad), value, dtype=t.dtype, device=t.device)
    return torch.cat([t[..., :-1], filler, t[..., -1:]], -1)


class LandmarkTokens(nn.Module):
    """The trainable landmark token: a learned ``dim`` vector inserted after every ``block - 1``
    regular tokens (the paper's ``mem_id`` token, whose embedding trains with the model).

        marks = LandmarkTokens(dim, block=64)
        h = marks.insert(x)                  # (B, L, dim) -> (B, L + L // (block - 1), dim)
        h = blocks(h)                        # layers built with ak.nn.Attention(..., method="landmark", block=64)
        y = marks.remove(h, x.shape[1])      # back to the L regular positions

    The landmark's hidden state evolves through the layers (it attends to its block like any token),
    which is what lets its key summarize the block; a trailing partial block gets no landmark
    (official ``auto_insert_landmarks`` needs whole blocks; here the tail is simply left open).
    """

    def __init__(self, dim: int, block: int = DEFAULT_BLOCK):
        super().__init__()
        if block < 2:
            raise ShapeError(f"block={block}: a block needs at least one regular token and its landmark (block >= 2).")
        self.block = block
        self.embedding = nn.Parameter(torch.randn(dim) * 0.02)

    def positions(self, length: int) -> torch.Tensor:
        """Positions of the ``length`` regular tokens in the sequence with landmarks."""
        r = torch.arange(length)
        return r + r // (self.block - 1)

    def insert(self, x: torch.Tensor) -> torch.Tensor:
        B, L, dim = x.shape
        total = L + L // (self.block - 1)
        out = self.embedding.to(x.dtype).expand(B, total, dim).clone()
        out[:, self.positions(L).to(x.device)] = x
        return out

    def remove(self, h: torch.Tensor, length: int) -> torch.Tensor:
        return h[:, self.positions(length).to(h.device)]


__all__ = ["Landmark", "LandmarkTokens", "is_landmark"]
