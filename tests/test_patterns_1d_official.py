"""The 1D patterns against the procedures of the official code, re-enacted step by step here (written
from the specs and the official code's behaviour, not copied): dkernel's block mask (S2), LongLoRA's
varlen groups and its roll / unroll, StreamingLLM's evicting cache, tensor2tensor's table slicing
and skew (Music Transformer)."""

import itertools

import pytest
import torch

import attnkit as ak
from attnkit.api import _dispatch
from attnkit.patterns.relative import relative_logits, relative_logits_gather, used_rows
from helpers import inputs, rel_err


# -- S2-Attention: dkernel get_sparse_attn_mask, block by block ---------------------------------
def dkernel_mask(H, Hkv, q_len, k_len, *, block, local, stride, causal, homo=False, dense=0, step=None,
                 offset=0, mode=None):
    """Token mask (H, Lq, Lk) following dkernel's recipe: a block mask per kv head (repeated over
    its query heads), expanded to tokens, times the token causal mask; queries are the last Lq
    positions (past_len = Lk - Lq)."""
    mode = mode or ("absolute" if causal else "relative")
    left, right = (local, 1) if causal else ((local, local) if isinstance(local, int) else local)
    if causal and isinstance(local, tuple):
        left = local[0]
    step = step if step is not None else max(1, int(stride / (1 if homo else H)))
    past = k_len - q_len
    m = torch.zeros(H, q_len, k_len, dtype=torch.bool)
    for h in range(H):
        hk = 0 if homo else h // (H // Hkv)
        sparse = hk < Hkv - dense
        for i, j in itertools.product(range(q_len), range(k_len)):
            qb, kb = (i + past) // block, j // block
            if not sparse:
                keep = True
            elif mode == "absolute":
                keep = (kb + hk * step + offset) % stride == 0 or (qb - kb < left and kb - qb < right)
            else:
                dl, dr = max(0, qb - kb - left + 1), max(0, kb - qb - right + 1)
                keep = (dl + dr) % stride == 0
            m[h, i, j] = keep and (not causal or j <= i + past)
    return m


S2_CASES = [
    dict(H=4, Hkv=4, q_len=37, k_len=37, block=4, local=2, stride=4, causal=True),
    dict(H=8, Hkv=2, q_len=29, k_len=29, block=3, local=1, stride=3, causal=True, dense=1),
    dict(H=4, Hkv=2, q_len=5, k_len=40, block=4, local=2, stride=3, causal=True, offset=2, step=2),
    dict(H=2, Hkv=2, q_len=33, k_len=33, block=2, local=2, stride=4, causal=True, homo=True),
    dict(H=4, Hkv=4, q_len=31, k_len=31, block=3, local=2, stride=3, causal=False),
    dict(H=6, Hkv=3, q_len=30, k_len=30, block=2, local=(1, 3), stride=4, causal=False, dense=1),
    dict(H=4, Hkv=4, q_len=26, k_len=26, block=2, local=2, stride=3, causal=False, mode="absolute"),
    dict(H=4, Hkv=4, q_len=26, k_len=26, block=2, local=3, stride=3, causal=True, mode="relative"),
]


@pytest.mark.parametrize("case", S2_CASES, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_s2_equals_dkernel_mask(case):
    want = dkernel_mask(**case)
    p = ak.patterns.s2(case["H"], kv_heads=case["Hkv"], sparse_block_size=case["block"],
                       local_blocks=case["local"], vert_stride=case["stride"], causal=case["causal"],
                       homo_head=case.get("homo", False), num_dense_heads=case.get("dense", 0),
                       head_sliding_step=case.get("step"), head_sliding_offset=case.get("offset", 0),
                       vert_position_type=case.get("mode"))
    got = p.dense(case["q_len"], case["k_len"])[0].expand_as(want)
    assert torch.equal(got, want)


def test_s2_union_over_heads_covers_the_context():
    """Spec check: with H >= vert_stride and no dense heads, the heads together see every causal pair."""
    p = ak.patterns.s2(8, sparse_block_size=4, local_blocks=1, vert_stride=8)
    m = p.to_dense(100)
    assert torch.equal(m.any(0), ak.patterns.causal().to_dense(100))
    assert not m.all(0)[ak.patterns.causal().to_dense(100)].all()  # while each head is sparse


# -- LongLoRA S2-Attn: the flash path's varlen groups and the original roll / unroll -----------
def varlen_groups(q, k, v, G, causal=True):
    """forward_flashattn: the first half of the heads in groups cut at 0, G, 2G...; the second half
    in groups cut at 0, G/2, G/2 + G, ... (cu_seqlens); attention within each group."""
    B, H, L, _ = q.shape
    out = torch.zeros(B, H, L, v.shape[-1], dtype=torch.float64)
    cuts = {False: list(range(0, L, G)) + [L], True: [0] + list(range(G // 2, L, G)) + [L]}
    for h in range(H):
        edges = cuts[h >= H - H // 2]
        for a, b in zip(edges[:-1], edges[1:]):
            if b > a:
                out[:, h:h + 1, a:b] = ak.reference(q[:, h:h + 1, a:b], k[:, h:h + 1, a:b], v[:, h:h + 1, a:b],
                                                    is_causal=causal)
    return out


def rolled_groups(q, k, v, G, causal):
    """forward_noflashattn: roll the shifted heads by -G/2, attend in groups of G (causal in the
    rolled order), roll the outputs back by +G/2."""
    B, H, L, _ = q.shape
    shifted = slice(H - H // 2, H)
    q, k, v = (t.clone() for t in (q, k, v))
    for t in (q, k, v):
        t[:, shifted] = t[:, shifted].roll(-G // 2, dims=2)
    groups = [t.reshape(B, H, L // G, G, t.shape[-1]).transpose(1, 2).reshape(B * L // G, H, G, -1)
              for t in (q, k, v)]
    out = ak.reference(*groups, is_causal=causal).reshape(B, L // G, H, G, -1).transpose(1, 2).reshape(B, H, L, -1)
    out[:, shifted] = out[:, shifted].roll(G // 2, dims=2)
    return out


@pytest.mark.parametrize("H,L,G", [(4, 32, 8), (2, 24, 6), (6, 40, 10), (4, 30, 7)])
def test_shifted_groups_no_wrap_equals_varlen_groups(H, L, G):
    q, k, v = inputs(B=2, H=H, Hkv=H, Lq=L, D=8)
    got = ak.attend(q, k, v, is_causal=True, method="shifted_groups", group_size=G, block_size=16)
    assert rel_err(got, varlen_groups(q, k, v, G)) < 1e-13
    if L % G == 0:  # the official ratio form: G = int(L * ratio)
        ratio = ak.attend(q, k, v, is_causal=True, method="shifted_groups", group_size_ratio=G / L, block_size=16)
        assert rel_err(ratio, got) < 1e-14


@pytest.mark.parametrize("H,L,G", [(4, 32, 8), (2, 24, 6), (4, 16, 16)])
def test_shifted_groups_roll_equals_roll_and_unroll(H, L, G):
    q, k, v = inputs(B=2, H=H, Hkv=H, Lq=L, D=8)
    official = ak.patterns.shifted_groups(G, heads=H, variant="roll", causal=True)
    got = ak.attend(q, k, v, pattern=official, block_size=16)
    assert rel_err(got, rolled_groups(q, k, v, G, causal=True)) < 1e-13
    noncausal = ak.attend(q, k, v, method="shifted_groups", group_size=G, variant="roll", block_size=16)
    assert rel_err(noncausal, rolled_groups(q, k, v, G, causal=False)) < 1e-13
    leak = official.to_dense(L)[H - 1]
    assert leak[0, L - 1] and not ak.patterns.shifted_groups(G, heads=H).to_dense(L)[H - 1, 0, L - 1]


def test_sink_groups_reconstruction():
    m = ak.patterns.sink_groups(8, heads=2, sinks=2).to_dense(24)  # head 0 plain groups, head 1 shifted
    groups = ak.patterns.shifted_groups(8, heads=2).to_dense(24)
    sinks = torch.zeros(24, 24, dtype=torch.bool)
    sinks[:, :2] = True
    assert torch.equal(m, (groups | sinks) & ak.patterns.causal().to_dense(24))


# -- StreamingLLM: the evicting start + recent cache, one token at a time ----------------------
@pytest.mark.parametrize("start,recent,L", [(4, 8, 40), (1, 5, 23), (0, 3, 12), (3, 50, 30)])
def test_sinks_equal_the_evicting_cache(start, recent, L):
    q, k, v = inputs(B=2, H=2, Hkv=2, Lq=L, D=8)
    got = ak.attend(q, k, v, is_causal=True, method="sinks", sinks=start, window=recent, block_size=16)
    cached = []  # positions held by StartRecentKVCache
    for t in range(L):
        if len(cached) + 1 > start + recent:  # evict_for_space(num_coming=1)
            cached = cached[:start] + cached[len(cached) - recent + 1:]
        cached.append(t)
        idx = torch.tensor(cached)
        row = ak.reference(q[:, :, t:t + 1], k[:, :, idx], v[:, :, idx])
        assert rel_err(got[:, :, t:t + 1], row) < 1e-13, t


# -- Music Transformer: tensor2tensor's table slicing and skew ---------------------------------
def t2t_used_rows(table, m, L, sides):
    """get_relative_embeddings_left / _left_right: pad max(L - m, 0) zero rows (top; both: top and
    bottom), slice from max(m - L, 0): L rows (left) or 2L - 1 rows (both)."""
    pad = max(L - m, 0)
    start = max(m - L, 0)
    zeros = torch.zeros(table.shape[0], pad, table.shape[-1], dtype=table.dtype)
    if sides == "left":
        return torch.cat([zeros, table], 1)[:, start:start + L]
    return torch.cat([zeros, table, zeros], 1)[:, start:start + 2 * L - 1]


@pytest.mark.parametrize("m,L", [(3, 7), (7, 7), (10, 4), (1, 5)])
def test_relative_table_slicing_follows_tensor2tensor(m, L):
    left = torch.randn(2, m, 4, dtype=torch.float64)
    both = torch.randn(2, 2 * m - 1, 4, dtype=torch.float64)
    assert torch.equal(used_rows(left, "left", L), t2t_used_rows(left, m, L, "left"))
    assert torch.equal(used_rows(both, "both", L), t2t_used_rows(both, m, L, "both"))


@pytest.mark.parametrize("sides,Lq,Lk,R", [("left", 9, 9, 4), ("left", 3, 11, 20), ("both", 8, 8, 5),
                                           ("both", 6, 6, 21), ("left", 1, 6, 3)])
def test_relative_skew_equals_gather(sides, Lq, Lk, R):
    q = torch.randn(2, 3, Lq, 5, dtype=torch.float64)
    table = torch.randn(3, R, 5, dtype=torch.float64)
    skew, gather = relative_logits(q, table, sides, Lk), relative_logits_gather(q, table, sides, Lk)
    defined = torch.ones(Lq, Lk, dtype=torch.bool) if sides == "both" else ak.patterns.causal().to_dense(Lq, Lk)
    assert rel_err(skew[..., defined], gather[..., defined]) < 1e-14


@pytest.mark.parametrize("causal,Lq,Lk,window", [(True, 17, 17, None), (False, 15, 15, None), (True, 6, 19, 5),
                                                 (False, 21, 21, 6)])
def test_relative_reference_skew_and_its_gradients_match_the_engines(causal, Lq, Lk, window):
    q, k, v = inputs(B=2, H=4, Hkv=2, Lq=Lq, Lk=Lk, D=6, grad=True, seed=4)
    table = (torch.randn(4, 2 * Lk - 1 if not causal else Lk, 6, dtype=torch.float64) * 0.5).requires_grad_()
    opts = {"embeddings": table, "window": window, "block_size": 16}
    impl, call, _, _ = _dispatch(q, k, v, None, 0.0, causal, None, True, "relative", "auto", None, opts)
    ref = impl.reference(call)  # the skew trick
    w = torch.randn_like(ref)
    want = torch.autograd.grad((ref * w).sum(), (q, k, v, table))
    for backend in ("dense", "blocksparse"):
        out = ak.attend(q, k, v, is_causal=causal, enable_gqa=True, method="relative", backend=backend, **opts)
        assert rel_err(out, ref) < 1e-12
        got = torch.autograd.grad((out * w).sum(), (q, k, v, table))
        for g, r, what in zip(got, want, ["q", "k", "v", "embeddings"]):
            assert rel_err(g, r) < 1e-11, (backend, what)
