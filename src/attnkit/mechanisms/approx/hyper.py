"""``hyper``: HyperAttention (Han et al. 2023, arXiv 2310.05869), sortLSH blocks plus uniformly
sampled columns, merged through their log-sum-exps; causal attention by recursive halving.

Shapes ``q (B, H, Lq, D)``, ``k, v (B, Hkv, Lk, ·)`` → ``(B, H, Lq, Dv)``; kv heads are repeated
to the query heads. Every form below is a weighted softmax ``out_i = Σ_j W_ij e^{s_ij} v_j /
Σ_j W_ij e^{s_ij}`` with ``s = q kᵀ · scale`` and weights ``W_ij ∈ {0, 1, 1 + c·Lk/m, c·Lk/m}``
(``c`` = times key j was sampled); the reference form builds ``W`` explicitly.

Non-causal ``hyper(q, k, v)`` (exact attention when ``Lq < min_seq_len``):

1. Angular LSH with ``r = lsh_bits`` random directions ``P ~ N(0, 1)^(D x r)`` shared by batch and
   heads: ``bin = Σ_i [x·P_i > 0] 2^i``, ``code = gray[bin]`` with the reflected Gray sequence
   ``gray_1 = [0, 1]``, ``gray_r = [gray_{r-1}, reverse(gray_{r-1}) + 2^(r-1)]``.
2. Keys sorted by code (stable); key block ``t`` = sorted keys ``[t·b, (t+1)·b)`` (``b =
   block_size``, ``nb = ceil(Lk / b)`` blocks). Query blocks: ``sorted`` (official) — queries
   sorted by code (stable), rank ``r`` → block ``r // bq`` with ``bq = ceil(ceil(Lq/b)·b / nb)``;
   ``matched`` — each query joins the block where its code sorts among the key codes
   (``searchsorted``, left), so a query's block depends on itself and the keys only.
3. ``W_ij = 1`` for key j in query i's block.
4. If ``sample_size = m > 0`` and ``Lk > b`` (and, sorted, ``Lq > bq``): ``m`` sorted-key
   positions drawn uniformly with replacement per (batch, head); each draw outside the query's
   own block adds ``Lk / m`` to ``W`` of its key.

Causal (bottom-right; exact attention when ``Lk <= min_seq_len``), for ``Lq == Lk = n``:
``hyper_causal`` returns exact causal attention when ``n <= max(min_seq_len, 1)``; otherwise
appends one zero row to q, k, v when ``n`` is odd, recurses on both halves (the official code
views them as ``2H`` heads of length ``n/2``) and adds the non-causal ``hyper`` of the lower half's
queries over the upper half's keys (matched blocks) to the lower half's rows (disjoint keys, one
softmax). ``Lq > Lk``: the first ``Lq - Lk`` rows see no key (0), the rest is aligned. ``Lq < Lk``:
``hyper`` over the ``Lk - Lq`` keys every query sees, merged with ``hyper_causal`` on the rest.

Randomness is fixed by ``seed``: the LSH directions come from stream 0, the samples of recursion
level ``l`` (heads ``H·2^l``, level 0 = the top call) from stream ``1 + l``, those of the
always-visible prefix of causal-cross calls from stream ``PREFIX_STREAM`` (CPU generators, so
every device draws the same numbers). The hash codes are computed in float64, so float32 and
float64 calls on the same values take the same blocks.

Confirmed in insuhan/hyper-attn @ 68b91e9 (``models/attention/hyper_attn.py``,
``angular_lsh.py``, ``utils.py``): defaults ``lsh_num_projs=7, block_size=256, sample_size=256,
min_seq_len=4096``; the Gray permutation and ``perm[bin]`` hash; stable sorts; queries padded to a
multiple of the block and ``query_block_size = Lq_pad / num_blocks``; samples ``torch.randint(n_key,
(B, H, m))`` into the sorted keys, same-block draws masked (their Triton path), ``lse + log(n_key/m)``;
sampling only when ``n_query > query_block_size and n_key > key_block_size``; exact attention when
``min_seq_len > n_query`` (non-causal) or ``n_key <= min_seq_len`` (causal); odd lengths padded with
a zero row; the ``2H``-head view of the halves. Differences, all deliberate: padded zero keys are
masked (the official block attention lets them take softmax mass); the merge uses the exact
``logaddexp`` (official: ``lse1 - log(c + eps)``); causal calls use ``matched`` query blocks —
with the official rank-based blocks a query's block depends on the later queries of its
half, so changing future tokens changes earlier rows (CAB's causal-leak test fails); leaves of
one token stop the recursion (``min_seq_len = 0`` recursed forever); causal-cross is attnkit's
extension (official: causal self only); the official CUDA path does not mask same-block draws.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ...backends.dense import masked_softmax_attention
from ...call import ALL_PATTERNS, AttentionCall
from ...errors import OptionError
from ...options import Option
from ...patterns.plan import cdiv
from ...reference import causal_mask
from ...registry import Method, MethodInfo, options, register
from ..linear.base import FormEngine
from ._common import expand_heads, gather_rows, lse_merge, masked_attention, seeded, work_dtype

PREFIX_STREAM = 999
GATHER_BUDGET = 1 << 24  # elements of one gathered (queries x block x D) key tile


@dataclass(frozen=True)
class HyperConfig:
    block: int
    samples: int
    min_len: int
    seed: int
    matched: bool
    scale: float


def gray_codes(bits: int) -> torch.Tensor:
    """The reflected Gray sequence of ``bits`` bits (``[0]`` for 0 bits)."""
    seq = torch.tensor([0])
    for i in range(bits):
        seq = torch.cat([seq, seq.flip(0) + (1 << i)])
    return seq


def lsh_projections(head_dim: int, bits: int, seed: int) -> torch.Tensor:
    """The ``(D, bits)`` float64 random directions of a call with ``seed`` (stream 0)."""
    return torch.randn(head_dim, bits, generator=seeded(seed, 0), dtype=torch.float64)


def lsh_codes(x: torch.Tensor, proj: torch.Tensor) -> torch.Tensor:
    """Angular-LSH codes ``(..., L)`` (int64) of ``x (..., L, D)``, in float64."""
    bits = (x.detach().to(torch.float64) @ proj.to(x.device)) > 0
    weights = 2 ** torch.arange(proj.shape[1], device=x.device)
    return gray_codes(proj.shape[1]).to(x.device)[(bits.long() * weights).sum(-1)]


def draw_samples(cfg: HyperConfig, stream: int, batch: int, heads: int, n_keys: int, device):
    """``(B, heads, m)`` sorted-key positions drawn for one (batched) non-causal call."""
    g = seeded(cfg.seed, stream)
    return torch.randint(n_keys, (batch, heads, cfg.samples), generator=g).to(device)


def query_blocks(q_codes, sorted_key_codes, q_len: int, k_len: int, cfg: HyperConfig):
    """Block of every query ``(..., Lq)`` and the sorted-mode query block size (None if matched)."""
    nb = cdiv(k_len, cfg.block)
    if cfg.matched:
        pos = torch.searchsorted(sorted_key_codes.contiguous(), q_codes.contiguous(), side="left")
        return torch.clamp(torch.div(pos, cfg.block, rounding_mode="floor"), max=nb - 1), None
    bq = cdiv(cdiv(q_len, cfg.block) * cfg.block, nb)
    rank = torch.argsort(torch.argsort(q_codes, dim=-1, stable=True), dim=-1)
    return torch.div(rank, bq, rounding_mode="floor"), bq


def samples_apply(cfg: HyperConfig, q_len: int, k_len: int, bq: int | None) -> bool:
    """Whether the residual is sampled (the official condition)."""
    return cfg.samples > 0 and k_len > cfg.block and (bq is None or q_len > bq)


# -- fast form --------------------------------------------------------------------------------
def _block_part_matched(q, ks, vs, blk, cfg: HyperConfig):
    """Each query against the keys of its block (gathered per query, in query chunks: a block's
    query count varies, so there is no fixed reshape as in the sorted mode)."""
    B, H, Lq, D = q.shape
    Lk, b = ks.shape[2], cfg.block
    rows = max(1, GATHER_BUDGET // max(1, B * H * b * max(D, vs.shape[-1])))
    outs, lses = [], []
    for r0 in range(0, Lq, rows):
        r1 = min(Lq, r0 + rows)
        idx = blk[:, :, r0:r1, None] * b + torch.arange(b, device=q.device)  # (B, H, R, b)
        valid = idx < Lk
        idx = idx.clamp(max=Lk - 1)
        kb, vb = gather_rows(ks, idx), gather_rows(vs, idx)  # (B, H, R, b, ·)
        s = torch.einsum("bhrd,bhrkd->bhrk", q[:, :, r0:r1], kb) * cfg.scale
        o, lse = masked_attention(s[..., None, :], valid[..., None, :], vb)
        outs.append(o.squeeze(-2))
        lses.append(lse.squeeze(-1))
    return torch.cat(outs, 2), torch.cat(lses, 2)


def _block_part_sorted(qs, ks, vs, bq: int, cfg: HyperConfig):
    """Sorted queries in blocks of ``bq`` against sorted keys in blocks of ``b`` (reshapes)."""
    B, H, Lq, D = qs.shape
    Lk, b = ks.shape[2], cfg.block
    nb = cdiv(Lk, b)
    pad_q, pad_k = nb * bq - Lq, nb * b - Lk
    qp = torch.nn.functional.pad(qs, (0, 0, 0, pad_q)).view(B, H, nb, bq, D)
    kp = torch.nn.functional.pad(ks, (0, 0, 0, pad_k)).view(B, H, nb, b, D)
    vp = torch.nn.functional.pad(vs, (0, 0, 0, pad_k)).view(B, H, nb, b, vs.shape[-1])
    valid = (torch.arange(nb * b, device=qs.device) < Lk).view(nb, 1, b)
    o, lse = masked_attention(qp @ kp.transpose(-1, -2) * cfg.scale, valid, vp)
    return o.reshape(B, H, nb * bq, -1)[:, :, :Lq], lse.reshape(B, H, nb * bq)[:, :, :Lq]


def hyper_noncausal(q, k, v, proj, cfg: HyperConfig, stream: int):
    """Non-causal HyperAttention; q, k, v share heads. Returns ``(out, lse)``."""
    B, H, Lq, _ = q.shape
    Lk = k.shape[2]
    if Lq < cfg.min_len:
        return masked_attention(q @ k.transpose(-1, -2) * cfg.scale, None, v)
    k_codes, k_order = torch.sort(lsh_codes(k, proj), dim=-1, stable=True)
    ks, vs = gather_rows(k, k_order), gather_rows(v, k_order)
    q_codes = lsh_codes(q, proj)
    blk, bq = query_blocks(q_codes, k_codes, Lq, Lk, cfg)
    if cfg.matched:
        qs, order = q, None
        out, lse = _block_part_matched(q, ks, vs, blk, cfg)
    else:  # work in the sorted query order, unsort at the end (as the official code)
        order = torch.argsort(q_codes, dim=-1, stable=True)
        qs = gather_rows(q, order)
        blk = torch.div(torch.arange(Lq, device=q.device), bq, rounding_mode="floor").expand(B, H, Lq)
        out, lse = _block_part_sorted(qs, ks, vs, bq, cfg)
    if samples_apply(cfg, Lq, Lk, bq):
        s = draw_samples(cfg, stream, B, H, Lk, q.device)
        keep = torch.div(s, cfg.block, rounding_mode="floor")[:, :, None, :] != blk[..., None]
        o_r, l_r = masked_attention(qs @ gather_rows(ks, s).transpose(-1, -2) * cfg.scale, keep, gather_rows(vs, s))
        out, lse = lse_merge(out, lse, o_r, l_r + math.log(Lk / cfg.samples))
    if order is not None:
        inverse = torch.argsort(order, dim=-1)
        out, lse = gather_rows(out, inverse), torch.gather(lse, 2, inverse)
    return out, lse


def _exact_causal(q, k, v, scale):
    return masked_attention(q @ k.transpose(-1, -2) * scale, causal_mask(q.shape[2], k.shape[2], q.device), v)


def hyper_causal(q, k, v, proj, cfg: HyperConfig, level: int = 0):
    """Causal HyperAttention for ``Lq == Lk`` by recursive halving. Returns ``(out, lse)``."""
    B, H, n, _ = q.shape
    if n <= max(cfg.min_len, 1):
        return _exact_causal(q, k, v, cfg.scale)
    if n % 2:
        q, k, v = (torch.nn.functional.pad(t, (0, 0, 0, 1)) for t in (q, k, v))
    half = q.shape[2] // 2
    o_d, l_d = hyper_causal(*(t.reshape(B, 2 * H, half, t.shape[-1]) for t in (q, k, v)), proj, cfg, level + 1)
    o_d, l_d = o_d.reshape(B, H, 2 * half, -1), l_d.reshape(B, H, 2 * half)
    o_u, l_u = hyper_noncausal(q[:, :, half:], k[:, :, :half], v[:, :, :half], proj, cfg, 1 + level)
    o_b, l_b = lse_merge(o_d[:, :, half:], l_d[:, :, half:], o_u, l_u)
    return torch.cat([o_d[:, :, :half], o_b], 2)[:, :, :n], torch.cat([l_d[:, :, :half], l_b], 2)[:, :, :n]


def _config(call: AttentionCall) -> HyperConfig:
    o = call.options
    mode = o["query_blocks"] or ("matched" if call.is_causal else "sorted")
    return HyperConfig(o["block_size"], o["sample_size"], o["min_seq_len"], o["seed"], mode == "matched", call.scale)


def _inputs(call: AttentionCall):
    wd = work_dtype(call.dtype)
    q = call.query.to(wd)
    k, v = (expand_heads(t.to(wd), call.heads) for t in (call.key, call.value))
    return q, k, v, lsh_projections(call.head_dim, call.options["lsh_bits"], call.options["seed"]), _config(call)


def _exact(call: AttentionCall, q, k, v) -> torch.Tensor:
    """The whole call below min_seq_len: exact attention through SDPA (no score matrix kept)."""
    if not call.is_causal or call.q_len == call.k_len:
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=call.is_causal, scale=call.scale)
    return masked_softmax_attention(q, k, v, causal_mask(call.q_len, call.k_len, q.device), None, call.scale)


def fast(call: AttentionCall) -> torch.Tensor:
    q, k, v, proj, cfg = _inputs(call)
    Lq, Lk = call.q_len, call.k_len
    if (Lq < cfg.min_len) if not call.is_causal else (Lk <= cfg.min_len):
        out = _exact(call, q, k, v)
    elif not call.is_causal:
        out, _ = hyper_noncausal(q, k, v, proj, cfg, 1)
    elif Lq >= Lk:
        out, _ = hyper_causal(q[:, :, Lq - Lk:], k, v, proj, cfg)
        out = torch.nn.functional.pad(out, (0, 0, Lq - Lk, 0))
    else:
        off = Lk - Lq
        o_p, l_p = hyper_noncausal(q, k[:, :, :off], v[:, :, :off], proj, cfg, PREFIX_STREAM)
        o_c, l_c = hyper_causal(q, k[:, :, off:], v[:, :, off:], proj, cfg)
        out, _ = lse_merge(o_p, l_p, o_c, l_c)
    return out.to(call.dtype)


# -- reference: the weight matrix W, built per (batch, head) -------------------------------------
def _noncausal_weights(q, k, proj, cfg: HyperConfig, samples) -> torch.Tensor:
    """``W (Lq, Lk)`` of one non-causal call on 2-D ``q (Lq, D)``, ``k (Lk, D)``; ``samples (m,)``."""
    Lq, Lk = q.shape[0], k.shape[0]
    if Lq < cfg.min_len:
        return torch.ones(Lq, Lk, dtype=torch.float64)
    k_codes, k_order = torch.sort(lsh_codes(k, proj), stable=True)
    block_of_key = torch.empty(Lk, dtype=torch.long)
    block_of_key[k_order] = torch.arange(Lk) // cfg.block  # key j sits at sorted position pos[j]
    blk, bq = query_blocks(lsh_codes(q, proj), k_codes, Lq, Lk, cfg)
    W = (block_of_key[None, :] == blk[:, None]).to(torch.float64)
    if samples_apply(cfg, Lq, Lk, bq):
        for s in samples.tolist():
            outside = (s // cfg.block != blk).to(torch.float64)
            W[:, k_order[s]] += outside * (Lk / cfg.samples)
    return W


def _causal_weights(W, q, k, rows, proj, cfg, samples_of_level, b, head, level=0, path=0):
    """Fill ``W`` for the sub-sequence ``rows`` (real positions, None = zero padding)."""
    n = len(rows)
    if n <= max(cfg.min_len, 1):
        for i, ri in enumerate(rows):
            for rj in rows[: i + 1]:
                if ri is not None and rj is not None:
                    W[ri, rj] = 1.0
        return
    rows = rows + [None] * (n % 2)
    half = len(rows) // 2
    _causal_weights(W, q, k, rows[:half], proj, cfg, samples_of_level, b, head, level + 1, 2 * path)
    _causal_weights(W, q, k, rows[half:], proj, cfg, samples_of_level, b, head, level + 1, 2 * path + 1)
    vec = lambda x, r: x[r] if r is not None else torch.zeros_like(x[0])  # noqa: E731
    qs = torch.stack([vec(q, r) for r in rows[half:]])
    ks = torch.stack([vec(k, r) for r in rows[:half]])
    samples = samples_of_level(level, half)[b, (head << level) + path]
    sub = _noncausal_weights(qs, ks, proj, cfg, samples)
    for i, ri in enumerate(rows[half:]):
        for j, rj in enumerate(rows[:half]):
            if ri is not None and rj is not None:
                W[ri, rj] = sub[i, j]


def reference_weights(call: AttentionCall) -> torch.Tensor:
    """The weight matrix ``W (B, H, Lq, Lk)`` (float64) of the call."""
    q, k, _, proj, cfg = _inputs(call)
    q, k = q.detach().double().cpu(), k.detach().double().cpu()
    B, H, Lq, Lk = call.batch, call.heads, call.q_len, call.k_len
    W = torch.zeros(B, H, Lq, Lk, dtype=torch.float64)
    if call.is_causal and Lk <= cfg.min_len:
        return causal_mask(Lq, Lk).double().expand(B, H, Lq, Lk).clone()

    drawn: dict[tuple[int, int], torch.Tensor] = {}

    def level_samples(level, n_keys):
        if (level, n_keys) not in drawn:
            drawn[level, n_keys] = draw_samples(cfg, 1 + level, B, H << level, n_keys, "cpu")
        return drawn[level, n_keys]

    for b in range(B):
        for h in range(H):
            if not call.is_causal:
                W[b, h] = _noncausal_weights(q[b, h], k[b, h], proj, cfg, level_samples(0, Lk)[b, h])
                continue
            skip, off = max(0, Lq - Lk), max(0, Lk - Lq)
            if off:
                pre = draw_samples(cfg, PREFIX_STREAM, B, H, off, "cpu")[b, h]
                W[b, h, :, :off] = _noncausal_weights(q[b, h], k[b, h, :off], proj, cfg, pre)
            sub = torch.zeros(Lq - skip, Lk - off, dtype=torch.float64)
            _causal_weights(sub, q[b, h, skip:], k[b, h, off:], list(range(Lq - skip)), proj, cfg,
                            level_samples, b, h)
            W[b, h, skip:, off:] = sub
    return W


def reference(call: AttentionCall) -> torch.Tensor:
    """``Σ_j W_ij e^{s_ij} v_j / Σ_j W_ij e^{s_ij}`` in float64 (rows with ``W = 0``: 0)."""
    W = reference_weights(call).to(call.device)
    q = call.query.double()
    k, v = (expand_heads(t.double(), call.heads) for t in (call.key, call.value))
    s = q @ k.transpose(-1, -2) * call.scale
    s = torch.where(W > 0, s, torch.full_like(s, float("-inf")))
    m = s.amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m)).detach()
    p = W * torch.exp(s - m)
    den = p.sum(-1, keepdim=True)
    return ((p @ v) / torch.where(den > 0, den, torch.ones_like(den))).to(call.dtype)


_ENGINES = (FormEngine("sortlsh", fast),)


@register
class Hyper(Method):
    info = MethodInfo(
        name="hyper", family="A", kind="approximate", patterns=ALL_PATTERNS, seed=(11,),
        summary="HyperAttention: sortLSH block-diagonal attention + uniformly sampled columns "
                "(LSE-merged); causal by recursive halving",
        backends=tuple(e.name for e in _ENGINES),
        options=options(
            Option("block_size", "int", 256, "keys per sortLSH block (official block_size)", low=1),
            Option("sample_size", "int", 256, "key columns sampled uniformly per (batch, head) for the "
                   "residual (official sample_size; 0 = blocks only)", low=0),
            Option("lsh_bits", "int", 7, "random hyperplanes of the angular LSH (official lsh_num_projs; "
                   "0 = no hashing: blocks of consecutive positions)", low=0, high=30),
            Option("min_seq_len", "int", 4096, "exact attention below this length (official "
                   "min_seq_len; also ends the causal recursion)", low=0),
            Option("seed", "int", 0, "seed of the LSH directions and the column samples", low=0),
            Option("query_blocks", "choice", None, "how queries meet key blocks: 'sorted' (official: "
                   "rank among the sorted queries) or 'matched' (the block where the query's code sorts "
                   "among the keys); None = sorted non-causal, matched causal", choices=("sorted", "matched"),
                   nullable=True)),
        references="Han et al. 2023, HyperAttention (arXiv 2310.05869); github.com/insuhan/hyper-attn "
                   "models/attention/hyper_attn.py")

    def engines(self):
        return _ENGINES

    def validate(self, call):
        if call.is_causal and call.options["query_blocks"] == "sorted":
            raise OptionError(
                "method 'hyper': query_blocks='sorted' with is_causal=True: a query's block would depend "
                "on later queries, so future tokens would change earlier outputs. Use "
                "query_blocks='matched' (or None, which picks it for causal calls).")

    def reference(self, call):
        return reference(call)

    def sample_options(self, rng, q_len, k_len):
        return {"block_size": int(rng.integers(1, 12)), "sample_size": int(rng.choice([0, 1, 3, 8, 20])),
                "lsh_bits": int(rng.integers(0, 5)), "min_seq_len": int(rng.choice([0, 1, 4, 9, 1000])),
                "seed": int(rng.integers(0, 100)), "query_blocks": [None, "matched"][int(rng.integers(2))]}

    def bench_options(self, q_len, k_len, density=None):
        """The paper's defaults (block 256, 256 samples, 7 bits, exact below 4096 tokens); with
        ``density`` (share of the ``Lq x Lk`` pairs), blocks and samples of ``ceil(density * Lk / 2)``
        keys each (a row sees its block plus the samples), exact leaves of that size; at
        ``density = 1`` one block holds every key: exact attention."""
        if density is None:
            return {}
        if density >= 1:
            return {"block_size": k_len, "sample_size": 0, "min_seq_len": k_len}
        size = max(1, math.ceil(density * k_len / 2))
        return {"block_size": size, "sample_size": size, "min_seq_len": size}


__all__ = ["Hyper", "HyperConfig", "gray_codes", "hyper_causal", "hyper_noncausal", "lsh_codes",
           "reference_weights"]
