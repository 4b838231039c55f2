"""Dynamic-sparsity methods with trainable parts (seer, dma, hcam, landmark): selections against
loop-by-loop re-derivations of the official rules, selection-then-oracle equality (seer, dma) or
the method's own two-level reference (hcam, landmark), density=1, gradients, decoding, the
learned layers and their training utilities, option errors, bench options and the GPU benchmark
script's CPU path."""

import importlib.util
import itertools
import json
import math
from pathlib import Path

import pytest
import torch

import attnkit as ak
from attnkit.mechanisms.sparse import dma as dma_mod
from attnkit.mechanisms.sparse._dma_layer import train_bias
from attnkit.mechanisms.sparse._hcam_layer import sinusoid_position_encoding
from attnkit.mechanisms.sparse._seer_gate import distillation_target, gate_recall, train_gate
from attnkit.mechanisms.sparse._two_level import GroupPlan, group_attention
from attnkit.mechanisms.sparse.landmark import LandmarkTokens
from attnkit.registry import get_method
from helpers import inputs, rel_err

METHODS = ["seer", "dma", "hcam", "landmark"]


pytestmark = pytest.mark.usefixtures("one_thread")


# -- seer ----------------------------------------------------------------------------------------
def official_seer_tiles(gate, knob, value, last_dense):
    """common.py's two rules, written out for a square block map (causal prefill)."""
    nb = gate.shape[-1]
    if knob == "threshold":
        m = gate > value
    else:
        k = int((1 - math.sqrt(1 - value)) * nb) or 1
        m = torch.zeros_like(gate, dtype=torch.bool).scatter(-1, gate.topk(k, -1).indices, True)
    if last_dense:
        m[..., -2:, :] = True
    return m.tril()


@pytest.mark.parametrize("knob,value", [("threshold", 0.1), ("threshold", 0.02), ("nz_ratio", 0.3), ("nz_ratio", 0.9)])
@pytest.mark.parametrize("last_dense", [True, False])
def test_seer_block_mask_follows_official_rules(knob, value, last_dense):
    q, k, v = inputs(B=2, H=4, Hkv=2, Lq=45, D=8, seed=1)
    nb = math.ceil(45 / 4)
    logits = torch.randn(2, 4, nb, nb, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    gate = torch.softmax(logits.masked_fill(torch.ones(nb, nb, dtype=torch.bool).triu(1), -1e9), -1)
    sel = ak.select(q, k, v, is_causal=True, enable_gqa=True, method="seer", gate_block=4, gate_scores=gate,
                    last_block_dense=last_dense, **{knob: value})
    assert torch.equal(sel.details["tiles"], official_seer_tiles(gate, knob, value, last_dense))
    blocks = sel.details["tiles"][:, :, torch.arange(45) // 4][..., torch.arange(45) // 4]
    assert torch.equal(sel.mask(), blocks & torch.ones(45, 45, dtype=torch.bool).tril())


def test_seer_pooled_gate_is_the_documented_stand_in():
    q, k, v = inputs(B=1, H=2, Hkv=1, Lq=19, D=8, seed=3)
    sel = ak.select(q, k, v, is_causal=True, enable_gqa=True, method="seer", gate_block=5, threshold=0.1)
    qm = torch.stack([q[:, :, i:i + 5].mean(2) for i in range(0, 19, 5)], 2)  # (1, 2, 4, 8)
    s = qm @ k[:, 0:1].transpose(-1, -2) * 8 ** -0.5  # (1, 2, 4, 19)
    logits = torch.stack([s[..., j:j + 5].amax(-1) for j in range(0, 19, 5)], -1)
    logits = logits.masked_fill(torch.ones(4, 4, dtype=torch.bool).triu(1), float("-inf"))
    assert torch.allclose(sel.details["gate"], torch.softmax(logits, -1))


def test_seer_distillation_target_is_the_row_normalised_block_max():
    q, k, _ = inputs(B=1, H=2, Hkv=1, Lq=23, D=8, seed=4)
    got = distillation_target(q, k, 4, True, 8 ** -0.5)
    p = torch.softmax((q @ k.transpose(-1, -2) * 8 ** -0.5).masked_fill(torch.ones(23, 23).triu(1).bool(),
                                                                        float("-inf")), -1)
    want = torch.zeros(1, 2, 6, 6, dtype=torch.float64)
    for a, b in itertools.product(range(6), range(6)):
        want[..., a, b] = p[..., a * 4:a * 4 + 4, b * 4:b * 4 + 4].amax((-1, -2))
    assert torch.allclose(got, want / want.sum(-1, keepdim=True))


def seer_toy(seed, B=4, L=128, dim=32):
    """Blocks of 8 tokens, each about one of 6 topics: attention has block structure to learn."""
    g = torch.Generator().manual_seed(seed)
    topics = torch.randn(6, dim, generator=g) * 2
    ids = torch.randint(0, 6, (B, L // 8), generator=g).repeat_interleave(8, 1)
    return topics[ids] + 0.3 * torch.randn(B, L, dim, generator=g)


def test_seer_gate_distillation_lowers_loss_and_raises_recall():
    torch.manual_seed(0)
    layer = ak.nn.Attention(32, 2, method="seer", learned=True, causal=True, rope=True, gate_block=8, gate_hidden=16)
    train, held_out = seer_toy(1), seer_toy(2)
    before = gate_recall(layer, held_out, 0.25)
    projections = [p.detach().clone() for p in layer.inner.q_proj.parameters()]
    losses = train_gate(layer, train, steps=40, lr=1e-2)
    after = gate_recall(layer, held_out, 0.25)
    assert losses[-1] < 0.2 * losses[0]
    assert after > before + 0.05, (before, after)
    assert all(torch.equal(a, b) for a, b in zip(projections, layer.inner.q_proj.parameters()))  # base frozen
    assert all(p.requires_grad for p in layer.parameters())  # requires_grad restored


def test_seer_layer_gradients_and_forward():
    torch.manual_seed(0)
    layer = ak.nn.Attention(32, 4, kv_heads=2, method="seer", learned=True, causal=True, rope=True, gate_block=4,
                            gate_hidden=8, density=0.5).double()
    x = torch.randn(2, 22, 32, dtype=torch.float64)
    inner = layer.inner
    inner.gate_loss(x).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in inner.gate.parameters())
    assert inner.q_proj.weight.grad is None  # the loss trains only the gate
    y = layer(x)
    sel, qr, kr = inner.selection(x)
    v = inner._heads(inner.v_proj(x), 2)
    want = ak.reference(qr, kr, v, mask=sel.mask())
    assert rel_err(y, inner.o_proj(want.transpose(1, 2).reshape(2, 22, -1))) < 1e-12
    gate_type = ak.nn.Attention(32, 4, method="seer", learned=True, causal=True, gate_type="Qavg_Kavg",
                                gate_hidden=8, gate_block=4)
    assert gate_type.inner.gate.linear_q is None  # one q pool and F == D: the official skip
    assert gate_type(torch.randn(1, 9, 32)).shape == (1, 9, 32)
    with pytest.raises(ak.ArgumentError, match="prefill"):
        layer.init_cache(2)


def test_seer_option_errors():
    q, k, v = inputs(B=1, H=2, Hkv=2, Lq=16, D=8)
    with pytest.raises(ak.OptionError, match="learned"):
        ak.attend(q, k, v, is_causal=True, method="seer", learned=True)
    with pytest.raises(ak.OptionError, match="one of"):
        ak.attend(q, k, v, is_causal=True, method="seer", threshold=0.1, density=0.5)
    with pytest.raises(ak.OptionError, match="gate_hidden"):
        ak.attend(q, k, v, is_causal=True, method="seer", gate_hidden=16)
    with pytest.raises(ak.OptionError, match=r"\(B\|1, H\|1, nq, nk\)"):
        ak.attend(q, k, v, is_causal=True, method="seer", gate_block=4, gate_scores=torch.rand(1, 2, 3, 3))
    with pytest.raises(ak.UnsupportedPatternError):
        ak.attend(q, k[:, :, :9], v[:, :, :9], is_causal=True, method="seer")


# -- dma -----------------------------------------------------------------------------------------
def official_dma_mask(beta, q_len, window, causal, smooth):
    """mask.py's topk_mask (+ block_smooth) row by row on a 4-D causal mask; ties to the later key."""
    B, H, L = beta.shape
    out = torch.zeros(B, H, q_len, L, dtype=torch.bool)
    for b, h, i in itertools.product(range(B), range(H), range(q_len)):
        a = i + L - q_len
        cand = list(range(min(L, a + 1))) if causal else list(range(L))
        if L > window:
            cand = sorted(cand, key=lambda j: (float(beta[b, h, j]), j), reverse=True)[:window]
        row = torch.zeros(L, dtype=torch.bool)
        row[cand] = True
        if smooth and L > window:
            for s in range(0, L, smooth):
                row[s:s + smooth] = int(row[s:s + smooth].sum()) * 2 > min(smooth, L - s)
        if causal:
            row[torch.arange(L) > a] = False
        out[b, h, i] = row
    return out


@pytest.mark.parametrize("causal,lq,lk", [(True, 21, 21), (True, 9, 21), (False, 21, 21), (False, 9, 17)])
@pytest.mark.parametrize("window,smooth", [(5, None), (1, None), (30, None), (6, 3), (4, 4)])
def test_dma_selection_follows_official_topk_and_smoothing(causal, lq, lk, window, smooth):
    q, k, v = inputs(B=2, H=4, Hkv=2, Lq=lq, Lk=lk, D=8, seed=5)
    A = torch.tensor([0.7, -1.3], dtype=torch.float64)
    opts = dict(window=window, A=A) | ({"smooth_block": smooth} if smooth else {})
    sel = ak.select(q, k, v, is_causal=causal, enable_gqa=True, method="dma", **opts)
    beta = A[:, None] * torch.nn.functional.softplus(v.mean(-1))
    want = official_dma_mask(beta, lq, window, causal, smooth).repeat_interleave(2, 1)
    assert torch.equal(sel.mask(), want)
    assert torch.allclose(sel.bias(), beta.repeat_interleave(2, 1)[:, :, None].expand(-1, -1, lq, -1))


def test_dma_eviction_times_with_ties_favour_recent_keys():
    beta = torch.zeros(1, 1, 12)  # A = 0 (the official initialisation): every bias ties
    until = dma_mod.eviction_times(beta, 3)
    assert torch.equal(until[0, 0], torch.tensor([3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 12, 12]))  # a sliding window
    beta = torch.randint(0, 3, (2, 3, 17)).float()
    for w in (1, 4, 20):
        want = official_dma_mask(beta, 17, w, True, None)
        assert torch.equal(ak.patterns.EvictionTimes(dma_mod.eviction_times(beta, w)).dense(17, 17), want)


@pytest.mark.parametrize("causal", [True, False])
def test_dma_selection_then_oracle_with_bias_and_parameter_gradients(causal):
    q, k, v = inputs(B=2, H=4, Hkv=2, Lq=26, D=8, Dv=6, seed=6, grad=True)
    g = torch.Generator().manual_seed(7)
    A = torch.randn(2, generator=g, dtype=torch.float64, requires_grad=True)
    W = (0.3 * torch.randn(2, 12, generator=g, dtype=torch.float64)).requires_grad_()
    bias = torch.randn(2, generator=g, dtype=torch.float64, requires_grad=True)
    opts = dict(window=7, A=A, dt_weight=W, dt_bias=bias)
    sel = ak.select(q, k, v, is_causal=causal, enable_gqa=True, method="dma", **opts)
    ref = ak.reference(q, k, v, mask=sel.mask(), bias=sel.bias())
    dt = (v.transpose(1, 2).reshape(2, 26, 12) @ W.T + bias).transpose(1, 2)
    beta = (A[:, None] * torch.nn.functional.softplus(dt)).repeat_interleave(2, 1)
    assert rel_err(ref, ak.reference(q, k, v, mask=sel.mask(), bias=beta[:, :, None])) < 1e-14
    w = torch.randn_like(ref)
    want = torch.autograd.grad((ref * w).sum(), (q, k, v, A, W, bias))
    for backend in ("blocksparse", "dense"):
        out = ak.attend(q, k, v, is_causal=causal, enable_gqa=True, method="dma", backend=backend, **opts)
        assert rel_err(out, ref) < 1e-12
        got = torch.autograd.grad((out * w).sum(), (q, k, v, A, W, bias))
        for a, b in zip(got, want):
            assert rel_err(a, b) < 1e-9, backend
    assert 0 < sel.density() < 1


def test_dma_density_one_is_dense_plus_bias():
    q, k, v = inputs(B=1, H=2, Hkv=1, Lq=20, D=8, seed=8)
    for causal in (True, False):
        sel = ak.select(q, k, v, is_causal=causal, enable_gqa=True, method="dma", density=1.0)
        out = ak.attend(q, k, v, is_causal=causal, enable_gqa=True, method="dma", density=1.0)
        assert sel.density() == 1.0
        assert rel_err(out, ak.reference(q, k, v, is_causal=causal, bias=sel.bias())) < 1e-12


def test_dma_learned_layer_trains_and_decodes():
    torch.manual_seed(0)
    layer = ak.nn.Attention(32, 4, kv_heads=2, method="dma", learned=True, causal=True, rope=True, window=6).double()
    x = torch.randn(2, 19, 32, dtype=torch.float64)
    with torch.no_grad():
        layer.inner.A.copy_(torch.tensor([0.5, -0.8]))
    layer(x).square().sum().backward()
    inner = layer.inner
    assert inner.A.grad.abs().sum() > 0 and inner.dt_proj.weight.grad.abs().sum() > 0
    full = layer(x)
    cache = layer.init_cache(2)
    steps = [layer(x[:, :4], cache=cache)] + [layer(x[:, t:t + 1], cache=cache) for t in range(4, 19)]
    assert rel_err(torch.cat(steps, 1), full) < 1e-10
    small = ak.nn.Attention(32, 4, kv_heads=2, method="dma", learned=True, causal=True, rope=True, window=16)
    losses = train_bias(small, torch.randn(4, 64, 32), steps=25, lr=5e-2)
    assert min(losses[-5:]) < 0.9 * losses[0]


def test_dma_option_errors():
    q, k, v = inputs(B=1, H=2, Hkv=2, Lq=16, D=8)
    with pytest.raises(ak.OptionError, match="density"):
        ak.attend(q, k, v, is_causal=True, method="dma", window=3, density=0.5)
    with pytest.raises(ak.OptionError, match=r"needs \(2, 16\)"):
        ak.attend(q, k, v, is_causal=True, method="dma", dt_weight=torch.zeros(2, 8))
    with pytest.raises(ak.OptionError, match="learned"):
        ak.attend(q, k, v, is_causal=True, method="dma", learned=True)
    with pytest.raises(ak.ArgumentError, match="owns A"):
        ak.nn.Attention(16, 2, method="dma", learned=True, A=torch.zeros(2))


# -- hcam ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("causal,lq,lk", [(True, 17, 17), (True, 6, 17), (False, 17, 17), (False, 6, 13)])
def test_hcam_one_token_chunks_keeping_everything_is_dense(causal, lq, lk):
    q, k, v = inputs(B=2, H=4, Hkv=2, Lq=lq, Lk=lk, D=8, seed=9)
    for opts in (dict(top_k=100), dict(density=1.0)):
        out = ak.attend(q, k, v, is_causal=causal, enable_gqa=True, method="hcam", chunk_size=1, **opts)
        assert rel_err(out, ak.reference(q, k, v, is_causal=causal)) < 1e-12
    out = ak.attend(q, k, v, is_causal=causal, enable_gqa=True, method="hcam", chunk_size=4, density=1.0)
    assert rel_err(out, ak.reference(q, k, v, is_causal=causal)) > 1e-3  # documented: two-level, not dense


@pytest.mark.parametrize("name,opts", [("hcam", dict(chunk_size=4, top_k=2)), ("landmark", dict(block=5, top_k=2))])
def test_two_level_plan_is_exact_inside_each_group(name, opts):
    """The exported selection (ak.explain(...).plan): each group's inner output is exact softmax
    attention over the group's allowed keys, and the output is their outer-softmax mixture."""
    q, k, v = inputs(B=1, H=2, Hkv=1, Lq=23, D=8, seed=10)
    plan = ak.explain(q, k, v, is_causal=True, enable_gqa=True, method=name, **opts).plan
    assert isinstance(plan, GroupPlan)
    pos = torch.arange(23)
    o, lse = group_attention(q, k, v, plan.groups, pos, plan.size, 8 ** -0.5, True, plan.skip_last)
    out = torch.zeros(1, 2, 23, 8, dtype=torch.float64)
    for h, i in itertools.product(range(2), range(23)):
        outer = plan.outer[0, h, i].clone()
        if plan.own_lse_slot is not None:
            outer[plan.own_lse_slot] = lse[0, h, i, plan.own_lse_slot]
        w = torch.softmax(outer, -1)
        for s, g in enumerate(plan.groups[0, h, i].tolist()):
            if g < 0:
                continue
            mask = (pos // plan.size == g) & (pos <= i)
            if plan.skip_last:
                mask &= (pos + 1) % plan.size != 0
            inner = ak.reference(q[:, h:h + 1, i:i + 1], k, v, mask=mask)[0, 0, 0]
            assert torch.allclose(o[0, h, i, s], inner, atol=1e-12)
            out[0, h, i] += w[s] * inner
    assert rel_err(ak.attend(q, k, v, is_causal=True, enable_gqa=True, method=name, **opts), out) < 1e-12


def test_hcam_learned_module():
    torch.manual_seed(0)
    layer = ak.nn.Attention(12, 3, method="hcam", learned=True, cross=True, chunk_size=5, top_k=4).double()
    x, memory = torch.randn(2, 9, 12, dtype=torch.float64), torch.randn(2, 35, 12, dtype=torch.float64)
    y = layer(x, context=memory)
    assert y.shape == (2, 9, 12) and torch.isfinite(y).all()
    y.square().sum().backward()
    inner = layer.inner
    assert inner.query_map.weight.grad.abs().sum() > 0 and inner.key_map.weight.grad.abs().sum() > 0
    enc = sinusoid_position_encoding(5, 12)
    freqs = 1e4 ** (-torch.arange(0, 12, 2) / 12)
    assert torch.allclose(enc[0], torch.cat([(4 * freqs).sin(), (4 * freqs).cos()]).float())
    causal = ak.nn.Attention(12, 3, method="hcam", learned=True, causal=True, chunk_size=3, top_k=2).double()
    x = torch.randn(2, 14, 12, dtype=torch.float64)
    full = causal(x)
    assert torch.equal(full[:, :2], torch.zeros_like(full[:, :2]))  # no complete chunk yet
    cache = causal.init_cache(2)
    steps = [causal(x[:, :5], cache=cache)] + [causal(x[:, t:t + 1], cache=cache) for t in range(5, 14)]
    assert rel_err(torch.cat(steps, 1), full) < 1e-12
    with pytest.raises(ak.ShapeError, match="multiple"):
        layer(x, context=memory[:, :33])
    with pytest.raises(ak.ArgumentError, match="rope"):  # its memory carries its own position encodings
        ak.nn.Attention(12, 3, method="hcam", learned=True, causal=True, rope=True)


# -- landmark ------------------------------------------------------------------------------------
def official_grouped_weights(logits, P):
    """The official grouped softmax, re-derived: group ids from a cumsum of the landmark flags, the
    landmarks and the current block in one bucket, each block's tokens scaled by their landmark."""
    L = logits.shape[-1]
    pos = torch.arange(L)
    is_mem = (pos + 1) % P == 0
    mem_ids = torch.cumsum(is_mem.long(), 0) - is_mem.long()
    w = torch.zeros_like(logits)
    for i in range(L):
        visible = pos <= i
        last = visible & (mem_ids == mem_ids[i])
        x = logits[..., i, :].masked_fill(~visible | (last & is_mem), float("-inf"))
        bucket = torch.where(last | is_mem, -1, torch.cumsum(is_mem.long(), 0))
        probs = torch.zeros_like(x)
        for gid in bucket[visible].unique().tolist():
            members = visible & (bucket == gid)
            probs[..., members] = torch.softmax(x[..., members], -1)
        landmark_prob = {int(b): probs[..., j] for b, j in zip(mem_ids[is_mem & visible], pos[is_mem & visible])}
        for j in range(i + 1):
            if last[j] and not is_mem[j]:
                w[..., i, j] = probs[..., j]
            elif not is_mem[j] and not last[j]:
                w[..., i, j] = probs[..., j] * landmark_prob[int(bucket[j])]
    return w


def test_landmark_matches_official_grouped_softmax_and_weights_are_normalised():
    P, L = 4, 19
    q, k, _ = inputs(B=1, H=2, Hkv=2, Lq=L, D=8, seed=11)
    v = torch.eye(L, dtype=torch.float64).expand(1, 2, L, L)  # the output rows are the weights
    w = ak.attend(q, k, v, is_causal=True, method="landmark", block=P)
    want = official_grouped_weights(q @ k.transpose(-1, -2) * 8 ** -0.5, P)
    assert rel_err(w, want) < 1e-12
    assert torch.allclose(w.sum(-1), torch.ones(1, 2, L, dtype=torch.float64))
    assert (w[..., (torch.arange(L) + 1) % P == 0] == 0).all()  # landmark values are never read


def test_landmark_retrieval_limits_and_decoding():
    q, k, v = inputs(B=2, H=4, Hkv=2, Lq=30, D=8, seed=12)
    full = ak.attend(q, k, v, is_causal=True, enable_gqa=True, method="landmark", block=5)
    for opts in (dict(top_k=6), dict(density=1.0), dict(top_k=100)):
        out = ak.attend(q, k, v, is_causal=True, enable_gqa=True, method="landmark", block=5, **opts)
        assert rel_err(out, full) < 1e-12  # retrieving every past block is the training formula
    short = ak.attend(q[:, :, :6], k[:, :, :6], v[:, :, :6], is_causal=True, enable_gqa=True, method="landmark",
                      block=8)
    assert rel_err(short, ak.reference(q[:, :, :6], k[:, :, :6], v[:, :, :6], is_causal=True)) < 1e-12
    sparse = ak.attend(q, k, v, is_causal=True, enable_gqa=True, method="landmark", block=5, top_k=1)
    assert rel_err(sparse, full) > 1e-3
    torch.manual_seed(0)
    layer = ak.nn.Attention(32, 4, kv_heads=2, method="landmark", causal=True, rope=True, block=4, top_k=2).double()
    x = torch.randn(2, 21, 32, dtype=torch.float64)
    y = layer(x)
    cache = layer.init_cache(2)
    steps = [layer(x[:, :3], cache=cache)] + [layer(x[:, t:t + 1], cache=cache) for t in range(3, 21)]
    assert rel_err(torch.cat(steps, 1), y) < 1e-10


def test_landmark_tokens_train_with_the_model():
    torch.manual_seed(0)
    marks = LandmarkTokens(16, block=4)
    x = torch.randn(2, 10, 16)
    h = marks.insert(x)
    assert h.shape == (2, 13, 16) and torch.equal(marks.remove(h, 10), x)
    assert torch.equal(h[:, 3], marks.embedding.detach().expand(2, 16))
    layer = ak.nn.Attention(16, 2, method="landmark", causal=True, block=4, top_k=1)
    target = torch.randn(2, 10, 16)
    opt = torch.optim.Adam([*marks.parameters(), *layer.parameters()], lr=1e-2)
    losses = []
    for _ in range(30):
        loss = (marks.remove(layer(marks.insert(x)), 10) - target).square().mean()
        opt.zero_grad()
        loss.backward()
        assert marks.embedding.grad.abs().sum() > 0
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]


def test_landmark_and_hcam_option_errors():
    q, k, v = inputs(B=1, H=2, Hkv=2, Lq=16, D=8)
    with pytest.raises(ak.OptionError, match="not both"):
        ak.attend(q, k, v, is_causal=True, method="landmark", top_k=2, density=0.5)
    with pytest.raises(ak.UnsupportedPatternError):
        ak.attend(q, k, v, method="landmark")
    with pytest.raises(ak.OptionError, match="learned"):
        ak.attend(q, k, v, method="hcam", learned=True)
    with pytest.raises(ak.OptionError, match="position_encoding"):
        ak.attend(q, k, v, method="hcam", position_encoding=False)
    with pytest.raises(ak.ArgumentError, match="ak.select"):
        ak.select(q, k, method="hcam")


# -- shared: density = 1, bench options, bf16, the benchmark script ------------------------------
@pytest.mark.parametrize("name", ["seer", "dma"])
def test_density_one_is_dense(name):
    q, k, v = inputs(B=1, H=4, Hkv=2, Lq=24, D=8, seed=13)
    for causal in (True, False):
        sel = ak.select(q, k, v, is_causal=causal, enable_gqa=True, method=name, density=1.0)
        out = ak.attend(q, k, v, is_causal=causal, enable_gqa=True, method=name, density=1.0)
        assert sel.density() == 1.0
        assert rel_err(out, ak.reference(q, k, v, is_causal=causal, bias=sel.bias())) < 1e-12


@pytest.mark.parametrize("name", METHODS)
def test_bench_options_sweep_densities(name):
    impl = get_method(name)
    q, k, v = inputs(B=1, H=2, Hkv=2, Lq=256, D=8, seed=14)
    kept = []
    for d in (None, 0.05, 0.1, 0.25):
        opts = impl.bench_options(256, 256, d)
        assert opts == impl.bench_options(256, 256, d)  # deterministic
        out = ak.attend(q, k, v, is_causal=True, method=name, **opts)
        assert torch.isfinite(out).all()
        if d is not None and name in ("seer", "dma"):
            kept.append(ak.select(q, k, v, is_causal=True, method=name, **opts).density())
    assert kept == sorted(kept)


def test_bfloat16_runs():
    q, k, v = inputs(B=1, H=4, Hkv=2, Lq=64, D=16, dtype=torch.bfloat16)
    for name, opts in [("seer", dict(gate_block=8, density=0.3)), ("dma", dict(window=9)),
                       ("hcam", dict(chunk_size=8)), ("landmark", dict(block=8, top_k=2))]:
        out = ak.attend(q, k, v, is_causal=True, enable_gqa=True, method=name, **opts)
        assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_bench_dynamic_script_runs_the_trainable_methods_on_cpu(tmp_path):
    path = Path(__file__).resolve().parents[1] / "scripts" / "gpu" / "bench_dynamic.py"
    spec = importlib.util.spec_from_file_location("bench_dynamic", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.main(["--out", str(tmp_path), "--length", "128", "--heads", "2", "--dim", "16", "--reps", "1",
                "--densities", "0.25", "--device", "cpu", "--recall-rows", "16", "--methods", ",".join(METHODS)])
    rows = json.loads((tmp_path / "bench_dynamic.json").read_text())["rows"]
    assert {r["method"] for r in rows} == set(METHODS) | {"dense"}
    for r in rows:
        if r["method"] != "dense":
            assert "error" not in r, r
            assert r["selection_ms"] > 0 and r["attention_ms"] > 0 and 0 < r["density"] <= 1
            assert 0 <= r["recall"] <= 1 + 1e-9
            two_level = r["method"] in ("hcam", "landmark")
            assert r["backend"] == ("gather" if two_level else "blocksparse")
            assert r.get("dense_form_ms", 1) > 0 and (not two_level or "dense_form_ms" in r)
