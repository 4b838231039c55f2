"""The computations of ``routing`` (see ``routing.py`` for the definition): cluster similarities,
per-call k-means, the non-causal gather form and the causal scan over query blocks.

Notation: ``sims_q (B, H, Lq, C)`` / ``sims_k (B, H, Lk, C)`` are float64 similarities of the
layer-normalized queries / keys to the centroids (decisions only, no gradient); ``qa``, ``ka``
``(B, H, L, D)`` are what the scores use (normalized or raw, differentiable); ``v (B, H, Lk, Dv)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._common import gather_rows, layer_norm, masked_attention

NEG = float("-inf")


def similarities(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """``LN(x) · μ_c`` in float64: ``x (B, H, L, D)``, ``centroids (B|1, H, C, D)`` → ``(B, H, L, C)``."""
    return layer_norm(x.detach().double()) @ centroids.double().transpose(-1, -2)


def kmeans(items: torch.Tensor, centroids: torch.Tensor, iters: int) -> torch.Tensor:
    """Lloyd iterations on ``items (B, H, L, D)`` (float64) from ``centroids (1|B, H, C, D)``:
    each item joins its most similar centroid (largest dot product, as the official routing),
    each centroid becomes the mean of its items (unchanged when it has none)."""
    mu = centroids.double().expand(items.shape[0], -1, -1, -1)
    for _ in range(iters):
        hot = torch.nn.functional.one_hot((items @ mu.transpose(-1, -2)).argmax(-1), mu.shape[2]).double()
        count = hot.sum(2)[..., None]  # (B, H, C, 1)
        mu = torch.where(count > 0, hot.transpose(-1, -2) @ items / count.clamp(min=1), mu)
    return mu


def members(sims: torch.Tensor, window: int) -> torch.Tensor:
    """``(B, H, C, w)`` indices of each cluster's ``w`` most similar items, ascending positions
    (ties: the earlier item first)."""
    order = torch.sort(sims.transpose(-1, -2), dim=-1, descending=True, stable=True).indices
    return order[..., :window].sort(-1).values


def combine(total: torch.Tensor, count: torch.Tensor, eps: float) -> torch.Tensor:
    """Scatter average ``total / (count + eps)``; tokens in no cluster give 0."""
    c = count[..., None]
    return torch.where(c > 0, total / torch.where(c > 0, c + eps, torch.ones_like(c)), torch.zeros_like(total))


def noncausal(qa, ka, v, sims_q, sims_k, wq: int, wk: int, scale: float, eps: float) -> torch.Tensor:
    """Official routing: per cluster the ``wq`` top queries attend to the ``wk`` top keys."""
    iq, ik = members(sims_q, wq), members(sims_k, wk)  # (B, H, C, w)
    s = (gather_rows(qa, iq) @ gather_rows(ka, ik).transpose(-1, -2)) * scale  # (B, H, C, wq, wk)
    out, _ = masked_attention(s, None, gather_rows(v, ik))
    B, H, Lq = qa.shape[:3]
    flat = iq.reshape(B, H, -1)
    total = out.new_zeros(B, H, Lq, v.shape[-1]).scatter_add(2, flat[..., None].expand(-1, -1, -1, v.shape[-1]),
                                                           out.reshape(B, H, -1, v.shape[-1]))
    count = out.new_zeros(B, H, Lq).scatter_add(2, flat, torch.ones_like(flat, dtype=out.dtype))
    return combine(total, count, eps)


# -- causal: the official decoding rule for every row, as a scan over query blocks ---------------
@dataclass
class Carry:
    """What the causal scan keeps between query blocks (and decode steps), per cluster:
    ``key_index (B, H, C, wk)`` the top keys so far in ascending positions (-1: empty slot),
    ``key_sims`` their similarities (-inf: empty), ``query_sims (B, H, C, wq)`` the top query
    similarities so far (-inf: empty)."""

    key_index: torch.Tensor
    key_sims: torch.Tensor
    query_sims: torch.Tensor

    @classmethod
    def empty(cls, B, H, C, wq, wk, device):
        return cls(torch.full((B, H, C, wk), -1, dtype=torch.long, device=device),
                   torch.full((B, H, C, wk), NEG, dtype=torch.float64, device=device),
                   torch.full((B, H, C, wq), NEG, dtype=torch.float64, device=device))

    def add_keys(self, sims_k: torch.Tensor, first: int) -> None:
        """Take keys at positions ``first ...`` (their ``sims_k (B, H, n, C)``) without queries."""
        idx = torch.arange(first, first + sims_k.shape[2], device=sims_k.device)
        cand_idx = torch.cat([self.key_index, idx.expand(*self.key_index.shape[:3], -1)], -1)
        cand_sims = torch.cat([self.key_sims, sims_k.transpose(-1, -2)], -1)
        self._keep_keys(cand_idx, cand_sims)

    def add_queries(self, sims_q: torch.Tensor) -> None:
        """Take queries (``sims_q (B, H, n, C)``) that see no key."""
        allq = torch.cat([self.query_sims, sims_q.transpose(-1, -2)], -1)
        self.query_sims = allq.sort(-1, descending=True).values[..., : self.query_sims.shape[-1]]

    def _keep_keys(self, cand_idx, cand_sims) -> None:
        order = torch.sort(cand_sims, dim=-1, descending=True, stable=True).indices[..., : self.key_index.shape[-1]]
        idx, sims = torch.gather(cand_idx, -1, order), torch.gather(cand_sims, -1, order)
        by_pos = idx.sort(dim=-1, stable=True).indices
        self.key_index, self.key_sims = torch.gather(idx, -1, by_pos), torch.gather(sims, -1, by_pos)


def causal_block(carry: Carry, qa, ka, v, sims_q, sims_k, first: int, scale: float, eps: float) -> torch.Tensor:
    """Outputs of the aligned block of queries and keys at positions ``first ... first + T - 1``
    (query at position p sees keys <= p). ``qa (B, H, T, D)`` and ``sims_q, sims_k (B, H, T, C)``
    belong to the block; ``ka, v`` hold (at least) every key up to the block's end. Updates ``carry``.

    Attention is computed only for the (query, cluster) pairs where the query is a member (in
    each cluster, its member queries padded to the largest count of the block)."""
    B, H, T, _ = qa.shape
    wk = carry.key_index.shape[-1]
    dev = qa.device
    pos = torch.arange(first, first + T, device=dev)
    # keys: candidates = carried top keys + the block's keys, in ascending positions
    cand_idx = torch.cat([carry.key_index, pos.expand(B, H, carry.key_index.shape[2], T)], -1)
    cand_sims = torch.cat([carry.key_sims, sims_k.transpose(-1, -2)], -1)  # (B, H, C, wk + T)
    order = torch.sort(cand_sims, dim=-1, descending=True, stable=True).indices
    ranked = torch.gather(cand_idx, -1, order)  # positions, best first (-1: empty)
    # queries: member of cluster c iff fewer than wq earlier queries are at least as similar
    sq = sims_q.transpose(-1, -2).contiguous()  # (B, H, C, T)
    before = torch.searchsorted(-carry.query_sims.contiguous(), -sq, right=True)  # carried: best first
    earlier = torch.ones(T, T, dtype=torch.bool, device=dev).tril(-1)
    before = before + ((sq[..., None, :] >= sq[..., None]) & earlier).sum(-1)
    member = before < carry.query_sims.shape[-1]  # (B, H, C, T)
    # per cluster, its member queries (padded to the most any cluster has in this block) attend to
    # the top wk candidates at or before them
    count = member.sum(-1)  # (B, H, C)
    M = int(count.max()) if count.numel() else 0
    total = qa.new_zeros(B, H, T, v.shape[-1])
    if M > 0:
        local = torch.sort((~member).to(torch.int8), dim=-1, stable=True).indices[..., :M]  # (B, H, C, M)
        used = torch.arange(M, device=dev) < count[..., None]
        C = ranked.shape[2]
        safe = ranked.clamp(min=0)
        keys, vals = gather_rows(ka, safe), gather_rows(v, safe)  # (B, H, C, R, ·)
        qm = gather_rows(qa, local)  # (B, H, C, M, D)
        seen = (ranked[..., None, :] >= 0) & (ranked[..., None, :] <= (first + local)[..., None])
        alive = seen & (torch.cumsum(seen.to(torch.int32), -1) <= wk) & used[..., None]
        out, _ = masked_attention(qm @ keys.transpose(-1, -2) * scale, alive, vals)  # (B, H, C, M, Dv)
        out = out * used[..., None]
        idx = local.reshape(B, H, C * M)
        total = total.scatter_add(2, idx[..., None].expand(-1, -1, -1, v.shape[-1]), out.reshape(B, H, C * M, -1))
    # carry: the top keys at the block's last position, the top query similarities
    valid = ranked >= 0
    last = valid & (torch.cumsum(valid.to(torch.int32), -1) <= wk)
    keep_idx = torch.where(last, ranked, torch.full_like(ranked, -1))
    keep_sims = torch.where(last, torch.gather(cand_sims, -1, order), torch.full_like(cand_sims, NEG))
    by_pos = keep_idx.sort(dim=-1, stable=True).indices[..., -wk:]
    carry.key_index, carry.key_sims = torch.gather(keep_idx, -1, by_pos), torch.gather(keep_sims, -1, by_pos)
    carry.add_queries(sims_q)
    return combine(total, member.sum(2).to(total.dtype), eps)


def causal_scan(carry: Carry, qa, ka, v, sims_q, sims_k, first: int, scale: float, eps: float,
                block: int) -> torch.Tensor:
    """Aligned causal outputs of queries ``qa (B, H, n, D)`` at positions ``first ...``, whose keys
    are the last ``n`` of ``ka, v`` (everything before them is in ``carry``)."""
    ka, v = ka.contiguous(), v.contiguous()
    outs = []
    n = qa.shape[2]
    for t0 in range(0, n, block):
        t1 = min(n, t0 + block)
        outs.append(causal_block(carry, qa[:, :, t0:t1], ka, v, sims_q[:, :, t0:t1], sims_k[:, :, t0:t1],
                                 first + t0, scale, eps))
    return torch.cat(outs, 2)


def causal(qa, ka, v, sims_q, sims_k, wq: int, wk: int, scale: float, eps: float, block: int) -> torch.Tensor:
    """Bottom-right causal routing of a whole call (query i at key position ``i + Lk - Lq``)."""
    B, H, Lq, _ = qa.shape
    Lk, C = ka.shape[2], sims_q.shape[-1]
    carry = Carry.empty(B, H, C, wq, wk, qa.device)
    off = Lk - Lq
    if off > 0:
        carry.add_keys(sims_k[:, :, :off], 0)
        return causal_scan(carry, qa, ka, v, sims_q, sims_k[:, :, off:], off, scale, eps, block)
    skip = -off
    carry.add_queries(sims_q[:, :, :skip])
    out = causal_scan(carry, qa[:, :, skip:], ka, v, sims_q[:, :, skip:], sims_k, 0, scale, eps, block)
    return torch.nn.functional.pad(out, (0, 0, skip, 0))
