"""``hcam``: Hierarchical Chunk Attention Memory — attend to chunk summaries, keep the top-k chunks,
attend inside them (Lampinen et al. 2021, "Towards mental time travel", arXiv 2105.14039).

The official module (:mod:`._hcam_layer`, ``ak.nn.Attention(..., method="hcam", learned=True)``)
attends from a query to a memory of chunks through learned maps. ``ak.attend(method="hcam")`` is
the parameter-free adaptation of the spec (sparse.md §16) on ``q (B, H, Lq, D)``,
``k (B, Hkv, Lk, D)``, ``v (B, Hkv, Lk, Dv)``, with chunks of ``C = chunk_size`` keys and query i at
bottom-right position ``a = i + Lk - Lq``::

    chunk c        keys [cC, (c+1)C)  (the last one may be partial), summary k̄_c = their mean
    relevance      r[i, c]   = q_i · k̄_c · scale
    eligible       causal: the complete past chunks c < a // C;  otherwise every chunk
    kept           the top_k eligible chunks by r (or ceil(density * eligible)), plus, when causal,
                   the current chunk {(a // C) C, ..., a} with r = q_i · mean(its keys) · scale
    inner          o[i, c]   = softmax_{j in c, j <= a if causal}(q_i · k_j · scale) v   (exact)
    out[i]         = Σ_{c kept} softmax_c(r[i, c]) · o[i, c]

Kind ``approximate``: the two-level weights are not one softmax over tokens; with ``chunk_size=1``
and every chunk kept it equals dense attention (each chunk is one token). "Exact once the
selection is made" means: given the kept chunks and their relevances (the plan that
``ak.explain(...).plan`` exports, a :class:`~._two_level.GroupPlan`), each ``o[i, c]`` is exact
softmax attention over chunk c. Backends: ``gather`` (each query's chunks gathered; work follows
the keys read) and ``dense`` (the same plan from dense score rows; see :mod:`._two_level`).
``density=1`` keeps every eligible chunk — the two-level attention without selection, not dense
attention. Selection is per query head (each head scores its kv
head's summaries) and reads only keys at or before the query when causal, so decoding through
``ak.nn.Attention``'s key/value cache equals the forward.

Confirmed in google-deepmind/deepmind-research @ f5de0ed
``hierarchical_transformer_memory/hierarchical_attention/htm_attention.py``
(``HierarchicalMemoryAttention.__call__``: relevance logits of a linear query map and a linear map of
the stop-gradient chunk keys, divided by ``sqrt(feature_size)``, masked to -1e6, ``top_k``,
``softmax`` over the top-k logits, multi-head attention inside each selected chunk, results summed
with those weights) and ``htm_attention_test.py`` (chunk keys = mean of the chunk's contents;
k = 4, chunks of 5-6, 7 memories). Adaptation (not in the official code): the summaries and the
relevance use the call's own q / k instead of learned maps; causal calls add the current partial
chunk as an always-kept chunk (the agent runs a separate local transformer for recent steps); a
query with no eligible chunk attends only its current chunk (officially it would spread over
masked memories at -1e6). Defaults: top_k = 4 (the test file); chunk_size = 64 is attnkit's
choice (the agents' chunk length is not in the released code).
"""

from __future__ import annotations

import math

import torch

from ...call import ALL_PATTERNS
from ...errors import OptionError
from ...options import Option
from ...patterns.plan import cdiv
from ...registry import Method, MethodInfo, options, register
from ._two_level import DensePlanEngine, GroupPlan, PlanEngine, gather_outer, top_groups
from .base import budget_from_density, by_query_head, density_option, key_means, resolve_budget, rows_per_chunk
from .seer import learned_option, refuse_learned

DEFAULT_TOP_K = 4
DEFAULT_CHUNK = 64


def prefix_means(key: torch.Tensor, chunk: int, positions: torch.Tensor) -> torch.Tensor:
    """Mean of keys ``[(a // chunk) * chunk, a]`` for each position ``a`` in ``positions (R,)`` (all
    ``>= 0``): ``(B, Hkv, R, D)``, differentiable."""
    cs = torch.nn.functional.pad(key.cumsum(2), (0, 0, 1, 0))
    start = positions // chunk * chunk
    return (cs[:, :, positions + 1] - cs[:, :, start]) / (positions - start + 1).to(key.dtype)[:, None]


@register
class HCAM(Method):
    info = MethodInfo(
        name="hcam", family="D", kind="approximate", seed=(56, 2), decode=True, patterns=ALL_PATTERNS,
        summary="HCAM: relevance to chunk summaries picks the top-k chunks; softmax inside each, weighted",
        backends=("gather", "dense"),
        options=options(
            Option("chunk_size", "int", DEFAULT_CHUNK, "keys per chunk (C)", low=1),
            Option("top_k", "int", None, f"chunks kept per query (k; default {DEFAULT_TOP_K}), besides the "
                   "current chunk when causal", low=1, nullable=True),
            density_option("each query's eligible chunks"),
            learned_option("the official module's query / key maps and within-chunk multi-head attention"),
            Option("position_encoding", "bool", None, "add sinusoidal encodings over the chunk slots to the memory "
                   "(official default True; learned layer only)", nullable=True)),
        references="Lampinen et al. 2021, Towards mental time travel (arXiv 2105.14039); github.com/google-deepmind/"
                   "deepmind-research hierarchical_transformer_memory/hierarchical_attention/htm_attention.py")

    def engines(self):
        return (PlanEngine(), DensePlanEngine())

    def validate(self, call):
        o = call.options
        resolve_budget(self.info.name, o, "top_k", DEFAULT_TOP_K)
        refuse_learned(self.info.name, o, "nothing (the functional form is parameter-free)")
        if o["position_encoding"] is not None:
            raise OptionError("method 'hcam': position_encoding configures the learned module of "
                              "ak.nn.Attention(..., method='hcam', learned=True); ak.attend has no memory encodings.")

    def prepare(self, call) -> GroupPlan:
        o = call.options
        rule, budget = resolve_budget(self.info.name, o, "top_k", DEFAULT_TOP_K)
        C = o["chunk_size"]
        wd = torch.float64 if call.dtype == torch.float64 else torch.float32
        q, k = call.query.to(wd), call.key.to(wd)
        means = by_query_head(key_means(k, C), call.group)  # (B, H, nC, D), differentiable
        B, H, n = call.batch, call.heads, means.shape[2]
        chunks = torch.arange(n, device=call.device)
        parts_g, parts_o = [], []
        step = rows_per_chunk(B * H * n, call.device)
        for r0 in range(0, call.q_len, step):
            r1 = min(call.q_len, r0 + step)
            a = torch.arange(r0, r1, device=call.device) + call.causal_offset
            qr = q[:, :, r0:r1]
            if call.is_causal:
                cur = torch.where(a >= 0, a // C, -1)
                eligible = chunks < cur[:, None]
                n_elig = cur.clamp(min=0)
            else:
                eligible = torch.ones(r1 - r0, n, dtype=torch.bool, device=call.device)
                n_elig = torch.full((r1 - r0,), n, device=call.device)
            keep = budget_from_density(budget, n_elig) if rule == "density" else n_elig.clamp(max=budget)
            with torch.no_grad():
                scores = qr @ means.detach().transpose(-1, -2)
            groups = top_groups(scores, eligible, keep)
            outer = gather_outer(lambda ids: _dot_rows(qr, means, ids) * call.scale, groups)
            if call.is_causal:
                valid = a >= 0
                mean_cur = by_query_head(prefix_means(k, C, a.clamp(min=0)), call.group)  # (B, H, R, D)
                r_cur = (qr * mean_cur).sum(-1) * call.scale
                groups = torch.cat([groups, torch.where(valid, cur, -1).expand(B, H, -1)[..., None]], -1)
                outer = torch.cat([outer, torch.where(valid, r_cur, float("-inf"))[..., None]], -1)
            parts_g.append(groups)
            parts_o.append(outer)
        width = max(g.shape[-1] for g in parts_g)
        groups = torch.cat([_pad_slots(g, width, -1) for g in parts_g], 2)
        outer = torch.cat([_pad_slots(x, width, float("-inf")) for x in parts_o], 2)
        return GroupPlan(groups, outer, C, call.is_causal, details={"chunks": n, "budget": (rule, budget)})

    def reference(self, call):
        """Row by row: relevances to every chunk mean, the top-k eligible chunks (+ the current
        one when causal), a softmax inside every chunk, the weighted sum (float64)."""
        o = call.options
        rule, budget = resolve_budget(self.info.name, o, "top_k", DEFAULT_TOP_K)
        C = o["chunk_size"]
        q, (k, v) = call.query.to(torch.float64), (t.to(torch.float64) for t in call.expanded_kv())
        B, H, Lk = call.batch, call.heads, call.k_len
        n = cdiv(Lk, C)
        pad = n * C - Lk
        kc = torch.nn.functional.pad(k, (0, 0, 0, pad)).view(B, H, n, C, -1)
        vc = torch.nn.functional.pad(v, (0, 0, 0, pad)).view(B, H, n, C, -1)
        real = (torch.arange(n * C) < Lk).view(n, C)
        means = kc.sum(3) / real.sum(-1).to(torch.float64)[:, None]
        out = torch.zeros(B, H, call.q_len, call.value_dim, dtype=torch.float64, device=call.device)
        for i in range(call.q_len):
            a = i + call.causal_offset
            if call.is_causal and a < 0:
                continue
            qi = q[:, :, i]
            rel = (means @ qi[..., None]).squeeze(-1) * call.scale  # (B, H, n)
            ok = real & (torch.arange(n * C).view(n, C) <= a) if call.is_causal else real
            s = torch.einsum("bhd,bhncd->bhnc", qi, kc) * call.scale
            inner = torch.softmax(s.masked_fill(~ok, float("-inf")), -1).nan_to_num(0.0)
            o_c = torch.einsum("bhnc,bhncd->bhnd", inner, vc)  # every chunk's inner attention
            eligible = n if not call.is_causal else a // C
            kept = torch.zeros(B, H, n, dtype=torch.bool)
            if eligible > 0:
                count = budget if rule == "top_k" else max(1, math.ceil(eligible * budget - 1e-9))
                top = rel[..., :eligible].topk(min(count, eligible), dim=-1).indices
                kept.scatter_(-1, top, True)
            logits = rel.masked_fill(~kept, float("-inf"))
            if call.is_causal:
                cur = a // C
                logits[..., cur] = (k[:, :, cur * C:a + 1].mean(2) * qi).sum(-1) * call.scale
            w = torch.softmax(logits, -1)
            out[:, :, i] = (w[..., None] * o_c).sum(2)
        return out.to(call.dtype)

    def sample_options(self, rng, q_len, k_len):
        opts = {"chunk_size": int(rng.integers(1, 9))}
        if rng.random() < 0.5:
            opts["top_k"] = int(rng.integers(1, 5))
        else:
            opts["density"] = float(rng.choice([0.1, 0.3, 0.6, 1.0]))
        return opts

    def bench_options(self, q_len, k_len, density=None):
        """Chunks of 64 (16 below 1024 keys); with ``density``, ``top_k = round(density * Lk / C)``
        chunks (at least 1): about that share of the keys read per query."""
        chunk = DEFAULT_CHUNK if k_len >= 1024 else 16
        opts = {} if chunk == DEFAULT_CHUNK else {"chunk_size": chunk}
        if density is not None:
            opts["top_k"] = max(1, round(density * k_len / chunk))
        return opts

    # -- the learned layer (the official module) ------------------------------------------------
    def owns_layer(self, options):
        return bool(options.get("learned"))

    def build_layer(self, **kwargs):
        from ._hcam_layer import HCAMLayer

        return HCAMLayer(self, **kwargs)


def _dot_rows(q: torch.Tensor, means: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """``q (B, H, R, D) · means[b, h, ids[b, h, r, s]]`` -> ``(B, H, R, S)``."""
    B, H, R, S = ids.shape
    picked = means.gather(2, ids.reshape(B, H, R * S, 1).expand(-1, -1, -1, means.shape[-1])).view(B, H, R, S, -1)
    return (picked * q[..., None, :]).sum(-1)


def _pad_slots(t: torch.Tensor, width: int, value) -> torch.Tensor:
    return torch.nn.functional.pad(t, (0, width - t.shape[-1]), value=value)


__all__ = ["HCAM", "prefix_means"]
