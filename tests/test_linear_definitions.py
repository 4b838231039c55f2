"""Each new method equals an independent transcription of its paper / official code (written here
in plain loops or the official formula), and keeps its numerical promises."""

import math

import pytest
import torch
import torch.nn.functional as F

import attnkit as ak
from attnkit.mechanisms.linear.aaren import combine
from attnkit.mechanisms.linear.based import taylor_features
from attnkit.mechanisms.linear.lightning import alibi_slopes
from helpers import inputs, rel_err


# -- lightning ----------------------------------------------------------------------------------
def test_lightning_slopes_follow_the_official_schedule():
    for H in (8, 16):
        start = 2 ** (-(2 ** -(math.log2(H) - 3)))
        assert alibi_slopes(H) == pytest.approx([start * start ** i for i in range(H)], rel=1e-15)
    assert alibi_slopes(12) == pytest.approx(alibi_slopes(8) + alibi_slopes(16)[0::2][:4], rel=1e-15)


def test_lightning_equals_the_official_masked_reference():
    q, k, v = inputs(B=1, H=4, Hkv=4, Lq=37, D=8, Dv=6)
    s = torch.tensor(alibi_slopes(4), dtype=torch.float64)
    mask = torch.zeros(4, 37, 37, dtype=torch.float64)
    for h in range(4):
        for i in range(37):
            for j in range(i + 1):
                mask[h, i, j] = math.exp(-s[h] * (i - j))
    want = ((q @ k.transpose(-1, -2)) * mask) @ v  # linear_attn: no scale, no normalization
    for backend in ("chunked", "parallel", "recurrent"):
        got = ak.attend(q, k, v, is_causal=True, scale=1.0, method="lightning", backend=backend, chunk_size=5)
        assert rel_err(got, want) <= 1e-12


def test_lightning_without_decay_is_unnormalized_causal_linear_attention():
    q, k, v = inputs(Lq=30, D=8)
    k2, v2 = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    want = torch.einsum("bhid,bhide->bhie", q, torch.cumsum(k2[..., :, None] * v2[..., None, :], 2))
    got = ak.attend(q, k, v, is_causal=True, enable_gqa=True, scale=1.0, method="lightning", slope_scale=0.0)
    assert rel_err(got, want) <= 1e-12


def test_lightning_noncausal_is_the_symmetric_decay_and_custom_slopes_work():
    q, k, v = inputs(B=1, H=2, Hkv=2, Lq=11, Lk=17, D=4)
    slopes = torch.tensor([0.3, 1.5], dtype=torch.float64)
    pos = torch.arange(11)[:, None] + 6
    dist = (pos - torch.arange(17)[None, :]).abs().to(torch.float64)
    want = ((q @ k.transpose(-1, -2)) * 0.5 * torch.exp(-slopes[:, None, None] * dist)) @ v
    got = ak.attend(q, k, v, scale=0.5, method="lightning", slopes=slopes, chunk_size=4)
    assert rel_err(got, want) <= 1e-12


def test_lightning_rejects_bad_slopes():
    q, k, v = inputs(Lq=5)
    with pytest.raises(ak.OptionError, match=r"shape \(4,\)"):
        ak.attend(q, k, v, enable_gqa=True, method="lightning", slopes=torch.ones(3))
    with pytest.raises(ak.OptionError, match=">= 0"):
        ak.attend(q, k, v, enable_gqa=True, method="lightning", slopes=-torch.ones(4))


def test_lightning_chunked_float32_is_stable_for_steep_decay_and_long_ranges():
    q, k, v = inputs(B=1, H=2, Hkv=2, Lq=600, D=8, dtype=torch.float32)
    for slopes in (torch.tensor([20.0, 1e-4]), torch.tensor([0.0, 5.0])):
        got = ak.attend(q, k, v, is_causal=True, method="lightning", slopes=slopes, chunk_size=64)
        want = ak.attend(q.double(), k.double(), v.double(), is_causal=True, method="lightning",
                         slopes=slopes.double(), backend="parallel")
        assert torch.isfinite(got).all() and rel_err(got, want) <= 1e-5


# -- based --------------------------------------------------------------------------------------
def official_taylor(x):
    """BASED's TaylorExp: [1, x / D^(1/4), vec(x x^T) / (sqrt(2) sqrt(D))], full D^2 product."""
    D = x.shape[-1]
    x2 = (x[..., :, None] * x[..., None, :]).flatten(-2) / math.sqrt(2)
    return torch.cat([torch.ones_like(x[..., :1]), x / D ** 0.25, x2 / math.sqrt(D)], -1)


def test_based_feature_map_gives_the_taylor_kernel():
    x, y = torch.randn(50, 16, dtype=torch.float64), torch.randn(50, 16, dtype=torch.float64)
    s = (x * y).sum(-1) / 4
    full = (official_taylor(x) * official_taylor(y)).sum(-1)
    folded = (taylor_features(x, 0.25) * taylor_features(y, 0.25)).sum(-1)
    assert torch.allclose(full, 1 + s + s * s / 2, rtol=1e-13)
    assert torch.allclose(folded, full, rtol=1e-13)
    assert official_taylor(x).shape[-1] == 273 and taylor_features(x, 0.25).shape[-1] == 153


def test_based_equals_the_official_quadratic_form():
    q, k, v = inputs(B=2, H=2, Hkv=2, Lq=45, D=16, Dv=32)
    pq, pk = official_taylor(q), official_taylor(k)
    y = torch.tril(pq @ pk.transpose(-1, -2)) @ v
    want = y / ((pq * pk.cumsum(2)).sum(-1) + 1e-12)[..., None]
    for backend in ("chunked", "parallel", "recurrent"):
        got = ak.attend(q, k, v, is_causal=True, method="based", backend=backend, chunk_size=16)
        assert rel_err(got, want) <= 1e-12
    w = ak.analysis.materialize("based", q, k, v, is_causal=True)
    assert torch.allclose(w.sum(-1), torch.ones_like(w.sum(-1)), atol=1e-12)


def test_based_is_close_to_softmax_for_small_scores():
    q, k, v = (t * 0.15 for t in inputs(B=1, H=1, Hkv=1, Lq=40, D=16))
    w = ak.analysis.materialize("based", q, k, v, is_causal=True)
    p = torch.softmax((q @ k.transpose(-1, -2) / 4).masked_fill(~torch.ones(40, 40, dtype=torch.bool).tril(), -math.inf), -1)
    assert (w - p).abs().max() / p.max() < 0.05


def test_based_layer_is_the_official_mixer():
    layer = ak.nn.Attention(64, 4, method="based", causal=True).double()  # feature_dim 16, head_dim 16
    shapes = {n: tuple(p.shape) for n, p in layer.named_parameters()}
    assert shapes == {"inner.proj_q.weight": (64, 64), "inner.proj_k.weight": (64, 64),
                      "inner.proj_v.weight": (64, 64), "inner.out_proj.weight": (64, 64)}
    layer = ak.nn.Attention(64, 4, head_dim=32, method="based", causal=True, feature_dim=8).double()
    assert layer.inner.proj_q.weight.shape == (32, 64) and layer.inner.proj_v.weight.shape == (128, 64)
    x = torch.randn(2, 13, 64, dtype=torch.float64)
    full = layer(x)
    cache = layer.init_cache(2)
    steps = torch.cat([layer(x[:, :4], cache=cache)] + [layer(x[:, t:t + 1], cache=cache) for t in range(4, 13)], 1)
    assert rel_err(steps, full) <= 1e-10
    cross = ak.nn.Attention(64, 4, method="based", cross=True, context_dim=24).double()
    assert cross(x, context=torch.randn(2, 7, 24, dtype=torch.float64)).shape == (2, 13, 64)
    q, k, v = inputs(Lq=9, D=8)
    with pytest.raises(ak.OptionError, match="feature_dim=16 but q and k have head dim 8"):
        ak.attend(q, k, v, enable_gqa=True, method="based", feature_dim=16)


def test_based_window_layer_is_sliding_window_65():
    """Official SlidingAttention(window_size=128) -> FlashAttention window (64, 0): 64 keys + self."""
    m = ak.patterns.sliding_window(window=65, causal=True).to_dense(200, 200)
    assert int(m[150].sum()) == 65 and bool(m[150, 86]) and not bool(m[150, 85])


# -- flow ---------------------------------------------------------------------------------------
def official_flow(q, k, v, causal, eps=1e-6, clamp=1.0):
    """Flow_Attention / Flow_Attention_Causal of thuml/Flowformer, after the projections."""
    q, k = torch.sigmoid(q), torch.sigmoid(k)
    L, S = q.shape[2], k.shape[2]
    if not causal:
        inc = 1.0 / torch.einsum("nhld,nhd->nhl", q + eps, k.sum(2) + eps)
        out = 1.0 / torch.einsum("nhld,nhd->nhl", k + eps, q.sum(2) + eps)
        c_sink = torch.einsum("nhld,nhd->nhl", q + eps, (k * out[..., None]).sum(2) + eps)
        c_src = torch.einsum("nhld,nhd->nhl", k + eps, (q * inc[..., None]).sum(2) + eps).clamp(-clamp, clamp)
        alloc = torch.sigmoid(c_sink * (L / S))
        comp = torch.softmax(c_src, -1) * S
        kv = torch.einsum("nhld,nhlm->nhdm", k, v * comp[..., None])
        return torch.einsum("nhld,nhdm->nhlm", q * inc[..., None], kv) * alloc[..., None]
    normal = torch.arange(L, dtype=q.dtype) + 1.0
    inc = 1.0 / torch.einsum("nhld,nhld->nhl", q + eps, k.cumsum(2) + eps) * normal
    out = 1.0 / torch.einsum("nhld,nhld->nhl", k + eps, q.cumsum(2) + eps) * normal
    c_sink = torch.einsum("nhld,nhld->nhl", q + eps, (k * out[..., None]).cumsum(2) + eps) / normal
    c_src = (torch.einsum("nhld,nhld->nhl", k + eps, (q * inc[..., None]).cumsum(2) + eps) / normal).clamp(-clamp, clamp)
    alloc = torch.sigmoid(c_sink)
    e = torch.exp(c_src)
    comp = e / e.cumsum(-1) * normal
    kv = torch.cumsum(torch.einsum("nhld,nhlm->nhldm", k, v * comp[..., None]), 2)
    return torch.einsum("nhld,nhldm->nhlm", q * (inc / normal)[..., None], kv) * alloc[..., None]


@pytest.mark.parametrize("causal,lk", [(True, 40), (False, 40), (False, 23)])
@pytest.mark.parametrize("clamp", [1.0, 5.0])
def test_flow_equals_the_official_code(causal, lk, clamp):
    q, k, v = (t * 2 for t in inputs(B=2, H=2, Hkv=2, Lq=40, Lk=lk, D=8, Dv=6))
    want = official_flow(q, k, v, causal, clamp=clamp)
    for backend in ("chunked", "parallel", "recurrent"):
        got = ak.attend(q, k, v, is_causal=causal, method="flow", backend=backend, clamp=clamp, chunk_size=7)
        assert rel_err(got, want) <= 1e-12


def test_flow_noncausal_self_is_permutation_equivariant():
    q, k, v = inputs(B=1, H=2, Hkv=2, Lq=30, D=8)
    perm = torch.randperm(30)
    out = ak.attend(q, k, v, method="flow")
    assert rel_err(ak.attend(q[:, :, perm], k[:, :, perm], v[:, :, perm], method="flow"), out[:, :, perm]) <= 1e-12


def test_flow_refuses_scale_and_causal_cross():
    q, k, v = inputs(Lq=10)
    with pytest.raises(ak.ArgumentError, match="takes no scale"):
        ak.attend(q, k, v, enable_gqa=True, method="flow", scale=0.5)
    with pytest.raises(ak.UnsupportedPatternError, match="causal-cross"):
        ak.attend(q, k[:, :, :7], v[:, :, :7], is_causal=True, enable_gqa=True, method="flow")


# -- aaren --------------------------------------------------------------------------------------
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("lq,lk", [(31, 31), (12, 31), (31, 12)])
def test_aaren_is_softmax_attention_by_a_scan(causal, lq, lk):
    q, k, v = inputs(Lq=lq, Lk=lk, D=8)
    want = ak.reference(q, k, v, is_causal=causal)
    shared = q[:, :, :1].expand(-1, -1, lq, -1)
    want_shared = ak.reference(shared, k, v, is_causal=causal)
    for backend in ("chunked", "parallel", "recurrent"):
        got = ak.attend(q, k, v, is_causal=causal, enable_gqa=True, method="aaren", backend=backend, chunk_size=5)
        assert rel_err(got, want) <= 1e-12
        got = ak.attend(shared, k, v, is_causal=causal, enable_gqa=True, method="aaren", backend=backend,
                        chunk_size=5, shared_query=True)
        assert rel_err(got, want_shared) <= 1e-12


def test_aaren_operator_is_associative():
    g = torch.Generator().manual_seed(0)
    a, b, c = ((torch.randn(3, generator=g) * 5, torch.rand(3, generator=g) + 0.1, torch.randn(3, 4, generator=g))
               for _ in range(3))
    left, right = combine(combine(a, b), c), combine(a, combine(b, c))
    for x, y in zip(left, right):
        assert torch.allclose(x, y, rtol=1e-5, atol=1e-6)


def test_aaren_is_stable_for_huge_scores():
    q, k, v = inputs(B=1, H=2, Hkv=2, Lq=50, D=4, dtype=torch.float32)
    q = (q[:, :, :1] * 3e3).expand(-1, -1, 50, -1)
    for backend in ("chunked", "recurrent"):
        got = ak.attend(q, k, v, is_causal=True, method="aaren", backend=backend, shared_query=True)
        want = ak.reference(q, k, v, is_causal=True)
        assert torch.isfinite(got).all() and rel_err(got, want) <= 1e-5


def test_aaren_shared_query_is_checked_and_decoding_needs_it():
    q, k, v = inputs(Lq=9)
    with pytest.raises(ak.OptionError, match="same query at every position"):
        ak.attend(q, k, v, enable_gqa=True, method="aaren", shared_query=True)
    with pytest.raises(ak.ArgumentError, match="cross"):
        ak.nn.Attention(16, 2, method="aaren", cross=True)


def test_aaren_layer_query_is_learned_and_input_independent():
    layer = ak.nn.Attention(16, 2, method="aaren", causal=True).double()
    params = dict(layer.named_parameters())
    assert params["inner.query"].shape == (2, 8) and "inner.q_proj.weight" not in params
    x = torch.randn(1, 6, 16, dtype=torch.float64, requires_grad=True)
    layer(x).sum().backward()
    assert params["inner.query"].grad.abs().sum() > 0


# -- lightnet -----------------------------------------------------------------------------------
def lightnet_definition(q, k, v, causal, z0=None):
    """o_i = sum_c q_i[c] sum_{s <= i} exp(k_s[c]) v_s / (exp(z0) + sum_{s <= i} exp(k_s[c]))."""
    out = torch.zeros(*q.shape[:3], v.shape[-1], dtype=torch.float64)
    extra = 0.0 if z0 is None else math.exp(z0)
    for i in range(q.shape[2]):
        last = i if causal else k.shape[2] - 1
        e = torch.exp(k[:, :, : last + 1])
        w = e / (extra + e.sum(2, keepdim=True))
        out[:, :, i] = torch.einsum("bhc,bhsc,bhse->bhe", q[:, :, i], w, v[:, :, : last + 1])
    return out


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("z0", [None, 0.0])
def test_lightnet_is_a_per_channel_softmax_over_time(causal, z0):
    q, k, v = inputs(B=2, H=2, Hkv=2, Lq=33, D=8, Dv=5)
    want = lightnet_definition(q * 0.5, k, v, causal, z0)
    for backend in ("chunked", "parallel", "recurrent"):
        got = ak.attend(q, k, v, is_causal=causal, scale=0.5, method="lightnet", backend=backend,
                        chunk_size=8, initial_lse=z0)
        assert rel_err(got, want) <= 1e-12


def test_lightnet_float32_chunked_survives_huge_key_jumps():
    q, k, v = inputs(B=1, H=2, Hkv=2, Lq=300, D=8, dtype=torch.float32, seed=4)
    k = k * 3
    k[:, :, 100] += 400.0  # the normalizer jumps by ~400 nats inside one chunk
    k[:, :, 205] -= 400.0
    got = ak.attend(q, k, v, is_causal=True, method="lightnet", chunk_size=64)
    want = ak.attend(q.double(), k.double(), v.double(), is_causal=True, method="lightnet", backend="recurrent")
    assert torch.isfinite(got).all() and rel_err(got, want) <= 1e-5


def test_lightnet_noncausal_scans_once_in_any_order():
    """Without position encodings the noncausal output is permutation-equivariant: a 2-D grid read
    row-major or column-major gives the same result."""
    q, k, v = inputs(B=1, H=2, Hkv=2, Lq=24, D=8)
    col = torch.arange(24).view(4, 6).T.reshape(-1)  # column-major order of a 4 x 6 grid
    out = ak.attend(q, k, v, method="lightnet")
    assert rel_err(ak.attend(q[:, :, col], k[:, :, col], v[:, :, col], method="lightnet"), out[:, :, col]) <= 1e-12


def test_lightnet_options_are_checked():
    q, k, v = inputs(Lq=12, D=8)
    with pytest.raises(ak.OptionError, match="chunk_size"):
        ak.attend(q, k, v, enable_gqa=True, method="lightnet", chunk_size=48)
    with pytest.raises(ak.OptionError, match="holds 16 tokens but the sequence has 12"):
        ak.attend(q, k, v, enable_gqa=True, method="lightnet", lrpe_grid=(4, 4))
    with pytest.raises(ak.OptionError, match="self-attention"):
        ak.attend(q, k[:, :, :5], v[:, :, :5], enable_gqa=True, method="lightnet", lrpe_grid=(12,))


def test_lightnet_lrpe_rotates_q_and_the_normalized_keys():
    q, k, v = inputs(B=1, H=2, Hkv=2, Lq=12, D=8)
    coords = ak.nn.grid_coordinates((3, 4), 12)
    rot = ak.nn.MdLrpe(8, 2)
    qr = rot(q * 8 ** -0.5, coords)
    kn = rot(torch.exp(k - torch.logsumexp(k, 2, keepdim=True)), coords)
    want = qr @ (kn.transpose(-1, -2) @ v)
    assert rel_err(ak.attend(q, k, v, method="lightnet", lrpe_grid=(3, 4)), want) <= 1e-12
