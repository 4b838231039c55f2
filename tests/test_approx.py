"""Approximate methods (routing, hyper, combiner, rettention, deltallm): reference forms against
independent definitions written here, error against exact attention falling as the budget grows
(exact at the full budget where the method allows it), bench_options, determinism, option errors.
States and layers are in test_approx_state.py."""

import math

import pytest
import torch

import attnkit as ak
from attnkit.mechanisms.approx import combiner, hyper, rettention, routing
from attnkit.mechanisms.approx._common import layer_norm, seeded
from attnkit.registry import get_method
from helpers import inputs, rel_err

APPROX = ["routing", "hyper", "combiner", "rettention", "deltallm"]


def fro(out, ref):
    ref = ref.double()
    return float((out.double() - ref).norm() / ref.norm())


def exact(q, k, v, causal=False, **kw):
    return ak.reference(q, k, v, is_causal=causal, **kw)


# -- HyperAttention: the official algorithm, written out --------------------------------------
def unit_hamming(n):
    if n == 1:
        return torch.tensor([0, 1])
    a = unit_hamming(n - 1)
    return torch.cat([a, a.flip(0) + 2 ** (n - 1)])


def official_hash(x, proj):
    bits = (x @ proj) > 0
    return unit_hamming(proj.shape[1])[(bits.long() * 2 ** torch.arange(proj.shape[1])).sum(-1)]


def official_noncausal(q, k, v, scale, b, m, bits, min_len, seed, stream=1):
    """insuhan/hyper-attn forward_no_causal_mask (torch path), zero padding keys masked; 2-D q, k, v."""
    Lq, Lk = q.shape[0], k.shape[0]
    if min_len > Lq:
        return torch.softmax(q @ k.T * scale, -1) @ v, torch.logsumexp(q @ k.T * scale, -1)
    proj = torch.randn(q.shape[1], bits, generator=seeded(seed, 0), dtype=torch.float64)
    qi = torch.sort(official_hash(q, proj), stable=True).indices
    ki = torch.sort(official_hash(k, proj), stable=True).indices
    pad = lambda x, n: torch.cat([x, x.new_zeros(n - x.shape[0], x.shape[1])])  # noqa: E731
    Lq_pad, Lk_pad = math.ceil(Lq / b) * b, math.ceil(Lk / b) * b
    qs, ks, vs = pad(q[qi], Lq_pad), pad(k[ki], Lk_pad), pad(v[ki], Lk_pad)
    nb = Lk_pad // b
    bq = Lq_pad // nb
    assert Lq_pad % nb == 0  # the official code needs it; the tests pick such shapes
    s = torch.full((Lq_pad, Lk_pad), float("-inf"), dtype=torch.float64)
    for t in range(nb):
        s[t * bq:(t + 1) * bq, t * b:(t + 1) * b] = qs[t * bq:(t + 1) * bq] @ ks[t * b:(t + 1) * b].T * scale
    s[:, Lk:] = float("-inf")
    lse1 = torch.logsumexp(s, -1)[:Lq]
    o1 = (torch.softmax(s, -1) @ vs)[:Lq]
    if m > 0 and Lq > bq and Lk > b:
        B, H = 1, 1
        samp = torch.randint(Lk, (B, H, m), generator=seeded(seed, stream))[0, 0]
        s2 = qs[:Lq] @ ks[samp].T * scale
        s2[(torch.arange(Lq)[:, None] // bq) == (samp[None, :] // b)] = float("-inf")
        lse2 = torch.logsumexp(s2, -1) + math.log(Lk / m)
        o2 = torch.nan_to_num(torch.softmax(s2, -1)) @ vs[samp]
        lse = torch.logaddexp(lse1, lse2)
        o1 = torch.exp(lse1 - lse)[:, None] * o1 + torch.exp(lse2 - lse)[:, None] * o2
        lse1 = lse
    inv = torch.argsort(qi)
    return o1[inv], lse1[inv]


@pytest.mark.parametrize("L,b,m,bits", [(48, 8, 16, 3), (64, 16, 40, 5), (40, 40, 8, 2), (30, 16, 12, 4)])
def test_hyper_noncausal_is_the_official_algorithm(L, b, m, bits):
    q, k, v = inputs(B=1, H=1, Hkv=1, Lq=L, D=8, seed=L + b)
    got = ak.attend(q, k, v, method="hyper", block_size=b, sample_size=m, lsh_bits=bits, min_seq_len=0, seed=3)
    want, _ = official_noncausal(q[0, 0], k[0, 0], v[0, 0], 8 ** -0.5, b, m, bits, 0, 3)
    assert rel_err(got[0, 0], want) < 1e-12


def test_hyper_spec_checks():
    q, k, v = inputs(B=2, H=2, Hkv=1, Lq=40, D=8)
    # below min_seq_len: exact, causal or not
    for causal in (False, True):
        got = ak.attend(q, k, v, is_causal=causal, enable_gqa=True, method="hyper")
        assert rel_err(got, exact(q, k, v, causal)) < 1e-12
    # no samples, blocks of consecutive positions (no hashing): block-diagonal masked attention
    got = ak.attend(q, k, v, enable_gqa=True, method="hyper", block_size=8, sample_size=0, lsh_bits=0, min_seq_len=0)
    blocks = (torch.arange(40)[:, None] // 8) == (torch.arange(40)[None, :] // 8)
    assert rel_err(got, exact(q, k, v, mask=blocks)) < 1e-12
    # one block with every key: exact
    got = ak.attend(q, k, v, enable_gqa=True, method="hyper", block_size=40, min_seq_len=0)
    assert rel_err(got, exact(q, k, v)) < 1e-12


def test_hyper_causal_top_half_is_the_causal_call_on_the_first_half():
    """Without samples (the only random part), rows < n/2 of the recursion are the causal call on the
    first half alone (spec check); the weights never reach a future key."""
    q, k, v = inputs(B=1, H=2, Hkv=2, Lq=64, D=8, seed=4)
    opts = dict(block_size=4, sample_size=0, lsh_bits=3, min_seq_len=8)
    full = ak.attend(q, k, v, is_causal=True, method="hyper", **opts)
    half = ak.attend(q[:, :, :32], k[:, :, :32], v[:, :, :32], is_causal=True, method="hyper", **opts)
    assert rel_err(full[:, :, :32], half) < 1e-12
    W = hyper.reference_weights(_call("hyper", q, k, v, True, **{**opts, "sample_size": 5}))
    assert not W.triu(1).any() and (W.diagonal(dim1=-2, dim2=-1) == 1).all()


def test_hyper_residual_is_unbiased():
    """Over many seeds the sampled residual's weights average to 1 on keys outside the block."""
    q, k, v = inputs(B=1, H=1, Hkv=1, Lq=32, D=8, seed=2)
    total = torch.zeros(32, 32, dtype=torch.float64)
    seeds = 300
    for s in range(seeds):
        total += hyper.reference_weights(_call("hyper", q, k, v, False, block_size=8, sample_size=8,
                                               lsh_bits=0, min_seq_len=0, seed=s))[0, 0]
    mean = total / seeds
    blocks = (torch.arange(32)[:, None] // 8) == (torch.arange(32)[None, :] // 8)
    assert torch.equal(mean[blocks], torch.ones_like(mean[blocks]))
    assert abs(float(mean[~blocks].mean()) - 1) < 0.05


# -- Routing: the official rules, written out ---------------------------------------------------
def _call(name, q, k, v, causal, **opts):
    from attnkit.api import _dispatch

    return _dispatch(q, k, v, None, 0.0, causal, None, q.shape[1] != k.shape[1], name, "auto", None, opts)[1]


def test_routing_noncausal_is_clustered_attention():
    q, k, v = inputs(B=2, H=2, Hkv=2, Lq=30, Lk=22, D=8, seed=6)
    mu = torch.randn(2, 3, 8, dtype=torch.float64)
    got = ak.attend(q, k, v, method="routing", centroids=mu, window=7, eps_scatter=0.0)
    qn, kn = layer_norm(q), layer_norm(k)
    total, count = torch.zeros_like(got), torch.zeros(2, 2, 30, 1, dtype=torch.float64)
    for c in range(3):
        tq = torch.sort(-(qn @ mu[:, c, :, None]).squeeze(-1), stable=True).indices[..., :7]
        tk = torch.sort(-(kn @ mu[:, c, :, None]).squeeze(-1), stable=True).indices[..., :7]
        inq = torch.zeros(2, 2, 30, dtype=torch.bool).scatter(-1, tq, True)
        ink = torch.zeros(2, 2, 22, dtype=torch.bool).scatter(-1, tk, True)
        o = exact(qn, kn, v, mask=inq[..., :, None] & ink[..., None, :], scale=8 ** -0.5)
        total += o * inq[..., None]
        count += inq[..., None]
    want = torch.where(count > 0, total / count.clamp(min=1), torch.zeros_like(total))
    assert rel_err(got, want) < 1e-12


def official_decoding(qn, kn, v, mu, w, eps, scale):
    """routing_transformer/utils.py at decode step t for every t (share_qk=False, one head):
    future distances blanked to 1e9, top_k per cluster, indices sorted, local-index causal mask,
    scatter average with +eps; row t of the result."""
    L, C = qn.shape[0], mu.shape[0]
    rows = []
    for t in range(L):
        total, count = torch.zeros(v.shape[1], dtype=torch.float64), 0.0
        for c in range(C):
            def top(x):
                d = -(x @ mu[c])
                d[t + 1:] = 1e9
                return torch.sort(torch.sort(d, stable=True).indices[:w]).values
            iq, ik = top(qn), top(kn)
            s = (qn[iq] @ kn[ik].T) * scale + torch.triu(torch.full((w, w), -1e30, dtype=torch.float64), 1)
            o = torch.softmax(s, -1) @ v[ik]
            for r, pos in enumerate(iq.tolist()):
                if pos == t:
                    total, count = total + o[r], count + 1
        rows.append(total / (count + eps))
    return torch.stack(rows)


@pytest.mark.parametrize("w", [1, 4, 9, 40])
def test_routing_causal_is_the_official_decoding_rule(w):
    q, k, v = inputs(B=1, H=1, Hkv=1, Lq=26, D=8, seed=w)
    mu = torch.randn(3, 8, dtype=torch.float64)
    got = ak.attend(q, k, v, is_causal=True, method="routing", centroids=mu, window=w, block_size=5)
    want = official_decoding(layer_norm(q[0, 0]), layer_norm(k[0, 0]), v[0, 0], mu, min(w, 26), 1e-2, 8 ** -0.5)
    assert rel_err(got[0, 0], want) < 1e-12


def test_routing_one_cluster_of_every_token_is_attention_on_normalized_inputs():
    q, k, v = inputs(B=2, H=2, Hkv=1, Lq=20, D=8, seed=1)
    for causal in (False, True):
        got = ak.attend(q, k, v, is_causal=causal, enable_gqa=True, method="routing", clusters=1, window=20,
                        eps_scatter=0.0, scale=1.0)
        assert rel_err(got, exact(layer_norm(q), layer_norm(k), v, causal, scale=1.0)) < 1e-12


def test_routing_kmeans_is_lloyd_iterations_on_the_normalized_keys():
    q, k, v = inputs(B=2, H=1, Hkv=1, Lq=64, D=8, seed=3)
    before = routing.centroids(_call("routing", q, k, v, False, clusters=4, kmeans_iters=3), k)
    after = routing.centroids(_call("routing", q, k, v, False, clusters=4, kmeans_iters=4), k)
    kn = layer_norm(k.double())
    assign = (kn @ before.transpose(-1, -2)).argmax(-1)  # one more step, by hand
    for b in range(2):
        for c in range(4):
            mine = assign[b, 0] == c
            want = kn[b, 0][mine].mean(0) if mine.any() else before[b, 0, c]
            assert torch.allclose(after[b, 0, c], want, atol=1e-12)


# -- Combiner: augmented-key definition -----------------------------------------------------------
def combiner_augmented(q, k, v, seg, causal, factorization="fixed", summary="identity-max", row="wsum"):
    """Combiner as exact attention over the keys plus every summary, with a per-query mask."""
    B, H, L, D = q.shape
    n = math.ceil(L / seg)
    s = D ** -0.5
    keys, vals = [], []
    for r in range(n):
        idx = list(range(r * seg, min(L, (r + 1) * seg)))
        qs, ks, vs = q[:, :, idx], k[:, :, idx], v[:, :, idx]
        if factorization == "fixed":
            act, pool = summary.split("-")
            f = torch.relu if act == "relu" else (lambda x: x)
            red = {"max": lambda x: x.amax(2), "mean": lambda x: x.mean(2), "sum": lambda x: x.sum(2)}[pool]
            qbar, kbar = red(f(qs * s)), red(f(ks))
            p = torch.softmax(torch.einsum("bhd,bhtd->bht", qbar, ks), -1)
            keys.append(kbar[:, :, None])
            vals.append(torch.einsum("bht,bhtd->bhd", p, vs)[:, :, None])
        else:
            p = torch.softmax(qs @ ks.transpose(-1, -2) * s, -1)
            keys.append(p @ ks if row == "wsum" else ks)
            vals.append(p @ vs)
    K, V = torch.cat([k] + keys, 2), torch.cat([v] + vals, 2)
    i = torch.arange(L)
    direct = (i[:, None] // seg == i[None, :] // seg) & (~torch.tensor(causal) | (i[None, :] <= i[:, None]))
    if factorization == "fixed":
        r = torch.arange(n)
        summ = (r[None, :] < (i[:, None] // seg)) if causal else torch.ones(L, n, dtype=torch.bool)
    else:
        j = torch.arange(K.shape[2] - L)  # summary j belongs to row j // seg, column j % seg
        summ = (j[None, :] % seg == i[:, None] % seg)
        summ = summ & ((j[None, :] // seg < i[:, None] // seg) if causal else torch.ones_like(summ))
    return exact(q, K, V, mask=torch.cat([direct, summ], 1))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("cfg", [dict(segment=5), dict(segment=4, local_summary="relu-mean"),
                                 dict(segment=7, local_summary="identity-sum"),
                                 dict(segment=6, factorization="axial"),
                                 dict(segment=4, factorization="axial", row_summary="none")])
def test_combiner_is_attention_over_keys_and_summaries(causal, cfg):
    q, k, v = inputs(B=2, H=2, Hkv=2, Lq=24, D=8, seed=cfg["segment"])
    got = ak.attend(q, k, v, is_causal=causal, method="combiner", **cfg)
    want = combiner_augmented(q, k, v, cfg["segment"], causal, cfg.get("factorization", "fixed"),
                              cfg.get("local_summary") or "identity-max", cfg.get("row_summary") or "wsum")
    assert rel_err(got, want) < 1e-12


def test_combiner_hand_example_and_exact_limits():
    q, k, v = inputs(B=1, H=1, Hkv=1, Lq=4, D=2, seed=0)
    s = 2 ** -0.5
    # query 3 sees keys {2, 3} directly and segment 0 through its summary (L=4, Ls=2, causal)
    qbar, kbar = (q[0, 0, :2] * s).amax(0), k[0, 0, :2].amax(0)
    sv = torch.softmax(k[0, 0, :2] @ qbar, 0) @ v[0, 0, :2]
    logits = torch.stack([q[0, 0, 3] @ k[0, 0, 2] * s, q[0, 0, 3] @ k[0, 0, 3] * s, q[0, 0, 3] @ kbar * s])
    w = torch.softmax(logits, 0)
    want = w[0] * v[0, 0, 2] + w[1] * v[0, 0, 3] + w[2] * sv
    got = ak.attend(q, k, v, is_causal=True, method="combiner", segment=2)
    assert rel_err(got[0, 0, 3], want) < 1e-12
    q, k, v = inputs(B=1, H=2, Hkv=1, Lq=30, D=8, seed=1)
    for cfg in (dict(segment=30), dict(segment=1), dict(segment=30, factorization="axial"),
                dict(segment=1, factorization="axial")):
        got = ak.attend(q, k, v, is_causal=True, enable_gqa=True, method="combiner", **cfg)
        assert rel_err(got, exact(q, k, v, True)) < 1e-12, cfg


# -- Re-ttention and DeltaLLM definitions -------------------------------------------------------
def cog_mask(L, text, frames, window):
    """generate_sliding_window_attention_mask of Re-ttention's Cog_processor, as the official loops."""
    P = (L - text) // frames
    m = torch.zeros(L, L, dtype=torch.bool)
    m[:text, :] = True
    m[:, :text] = True
    half = window // 2
    for f in range(frames):
        for i in range(P):
            lo, hi = max(0, i - half), min(P, i + half + 1)
            for g in range(frames):
                m[text + f * P + i, text + g * P + lo:text + g * P + hi] = True
    return m


def test_rettention_masks_are_the_official_masks():
    call = _call("rettention", *inputs(Lq=40), False, window_share=0.3)
    half = int(40 * 0.3) // 2
    i = torch.arange(40)
    assert torch.equal(rettention.mask_pattern(call).to_dense(40), (i[:, None] - i[None, :]).abs() <= half)
    call = _call("rettention", *inputs(Lq=46), False, window_share=0.5, frames=3, text_tokens=10)
    assert torch.equal(rettention.mask_pattern(call).to_dense(46), cog_mask(46, 10, 3, int(12 * 0.5)))


def test_rettention_stateless_step_is_rescaled_window_attention():
    q, k, v = inputs(B=2, H=2, Hkv=1, Lq=33, D=8, seed=3)
    rho, res = torch.rand(2, 2, 33, 1, dtype=torch.float64) + 0.5, torch.randn(2, 2, 33, 8, dtype=torch.float64)
    got = ak.attend(q, k, v, enable_gqa=True, method="rettention", window_share=0.4, rho=rho, residual=res)
    i = torch.arange(33)
    mask = (i[:, None] - i[None, :]).abs() <= int(33 * 0.4) // 2
    assert rel_err(got, rho * exact(q, k, v, mask=mask) + res) < 1e-12
    plain = ak.attend(q, k, v, enable_gqa=True, method="rettention", window_share=0.4)
    assert rel_err(plain, exact(q, k, v, mask=mask)) < 1e-12


def deltallm_definition(q, k, v, w, theta, variant):
    """Row by row, one (batch, head), scalar loops over the kept coordinates / far keys."""
    L, D = q.shape
    s = D ** -0.5
    rows, ref, prev = [], None, None
    for i in range(L):
        if variant == "query":
            ref = q[i].clone() if ref is None else torch.tensor(
                [q[i, d] if abs(q[i, d] - ref[d]) >= theta else ref[d] for d in range(D)], dtype=q.dtype)
            scores = [float((q[i] if i - j < w else ref) @ k[j]) * s for j in range(i + 1)]
        else:
            scores = [float(q[i] @ k[j]) * s for j in range(i + 1)]
            if prev is not None:
                scores = [prev[j] if i - j >= w and abs(scores[j] - prev[j]) < theta else scores[j]
                          for j in range(i + 1)]
            prev = scores
        rows.append(torch.softmax(torch.tensor(scores, dtype=q.dtype), 0) @ v[: i + 1])
    return torch.stack(rows)


@pytest.mark.parametrize("variant", ["query", "score"])
@pytest.mark.parametrize("w,theta", [(1, 0.3), (4, 0.8), (30, 0.5), (3, 0.0)])
def test_deltallm_is_its_definition(variant, w, theta):
    q, k, v = inputs(B=1, H=1, Hkv=1, Lq=24, D=6, seed=w)
    for backend in ("chunked", "recurrent"):
        got = ak.attend(q, k, v, is_causal=True, method="deltallm", backend=backend, window=w, threshold=theta,
                        variant=variant)
        assert rel_err(got[0, 0], deltallm_definition(q[0, 0], k[0, 0], v[0, 0], w, theta, variant)) < 1e-12
    if theta == 0.0 or w >= 24:
        assert rel_err(got, exact(q, k, v, True)) < 1e-12


# -- budgets: the error against exact attention falls as the budget grows --------------------------
SWEEPS = [
    ("hyper", False, "block_size", [6, 12, 24, 48, 96], dict(sample_size=0, lsh_bits=3, min_seq_len=0)),
    ("hyper", True, "block_size", [6, 12, 24, 48], dict(sample_size=0, lsh_bits=3), "min_seq_len"),
    ("hyper", False, "sample_size", [8, 64, 512, 4096], dict(block_size=8, lsh_bits=3, min_seq_len=0)),
    ("hyper", True, "sample_size", [8, 64, 512, 4096], dict(block_size=8, lsh_bits=3, min_seq_len=8)),
    ("routing", False, "clusters", [8, 4, 2, 1], dict(normalize=False, eps_scatter=0.0)),
    ("routing", True, "clusters", [8, 4, 2, 1], dict(normalize=False, eps_scatter=0.0)),
    ("combiner", True, "segment", [8, 16, 32, 64, 96], {}),
    ("combiner", True, "segment", [8, 16, 32, 48, 96], dict(factorization="axial")),
    ("combiner", False, "segment", [8, 16, 32, 96], {}),
    ("deltallm", True, "window", [1, 8, 32, 64, 96], dict(threshold=0.5)),
    ("deltallm", True, "threshold", [2.0, 1.0, 0.5, 0.1, 0.0], dict(window=4)),
    ("deltallm", True, "threshold", [2.0, 1.0, 0.5, 0.1, 0.0], dict(window=4, variant="score")),
    ("rettention", False, "window_share", [0.05, 0.2, 0.5, 1.0, 2.0], {}),
]


@pytest.mark.parametrize("sweep", SWEEPS, ids=lambda s: f"{s[0]}-{'causal' if s[1] else 'noncausal'}-{s[2]}")
def test_error_falls_as_the_budget_grows(sweep):
    name, causal, knob, values, fixed = sweep[:5]
    tie = sweep[5] if len(sweep) > 5 else None
    data = [inputs(B=1, H=2, Hkv=2, Lq=96, D=16, seed=s) for s in range(4)]
    errors = []
    for value in values:
        opts = {**fixed, knob: value, **({tie: value} if tie else {})}
        errors.append(sum(fro(ak.attend(2 * q, k, v, is_causal=causal, method=name, **opts),
                              exact(2 * q, k, v, causal)) for q, k, v in data) / len(data))
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    full_budget_exact = not (name == "combiner" and not causal) and knob != "sample_size"
    if full_budget_exact:
        assert errors[-1] < 1e-12, errors
    else:  # Combiner's non-causal rows also see their own segment's summary; sampling stays noisy
        assert errors[-1] > 1e-3


# -- bench_options ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", APPROX)
def test_bench_options_are_deterministic_and_run(name):
    impl = get_method(name)
    causal = "noncausal-self" not in impl.info.patterns
    for L in (40, 64):
        q, k, v = inputs(B=1, H=2, Hkv=2, Lq=L, D=8, seed=L)
        assert impl.bench_options(L, L) == impl.bench_options(L, L)
        ak.attend(q, k, v, is_causal=causal, method=name, **impl.bench_options(L, L))
        errs = []
        for d in (0.1, 0.3, 1.0):
            opts = impl.bench_options(L, L, d)
            assert opts == impl.bench_options(L, L, d)
            errs.append(fro(ak.attend(q, k, v, is_causal=causal, method=name, **opts), exact(q, k, v, causal)))
        exact_at_one = causal or name != "combiner"
        if exact_at_one:
            assert errs[-1] < 1e-12, (name, errs)
    if name == "combiner":  # causal: one segment at density 1
        q, k, v = inputs(B=1, H=2, Hkv=2, Lq=40, D=8)
        out = ak.attend(q, k, v, is_causal=True, method=name, **impl.bench_options(40, 40, 1.0))
        assert rel_err(out, exact(q, k, v, True)) < 1e-12


# -- determinism and errors ------------------------------------------------------------------------
def test_seeded_methods_are_deterministic_and_the_seed_matters():
    q, k, v = inputs(B=1, H=2, Hkv=2, Lq=64, D=8)
    opts = dict(block_size=8, sample_size=16, min_seq_len=0, lsh_bits=3)
    a = ak.attend(q, k, v, method="hyper", seed=5, **opts)
    assert torch.equal(a, ak.attend(q, k, v, method="hyper", seed=5, **opts))
    assert not torch.equal(a, ak.attend(q, k, v, method="hyper", seed=6, **opts))
    a = ak.attend(q, k, v, method="routing", clusters=4, seed=5)
    assert torch.equal(a, ak.attend(q, k, v, method="routing", clusters=4, seed=5))
    assert not torch.equal(a, ak.attend(q, k, v, method="routing", clusters=4, seed=6))


def test_option_errors_name_the_option_and_the_fix():
    q, k, v = inputs(Lq=30)
    kw = dict(enable_gqa=True)
    with pytest.raises(ak.OptionError, match="query_blocks='sorted' with is_causal=True.*matched"):
        ak.attend(q, k, v, is_causal=True, method="hyper", query_blocks="sorted", **kw)
    with pytest.raises(ak.OptionError, match="kmeans_iters=2 with is_causal=True"):
        ak.attend(q, k, v, is_causal=True, method="routing", kmeans_iters=2, **kw)
    with pytest.raises(ak.OptionError, match="share_qk apply to the layer"):
        ak.attend(q, k, v, method="routing", share_qk=True, **kw)
    with pytest.raises(ak.OptionError, match=r"centroids has shape \(3, 5\)"):
        ak.attend(q, k, v, method="routing", centroids=torch.zeros(3, 5), **kw)
    with pytest.raises(ak.OptionError, match="multiple of segment.*L=30, segment=7"):
        ak.attend(q, k, v, method="combiner", factorization="axial", segment=7, **kw)
    with pytest.raises(ak.OptionError, match="row_summary='none' does not apply"):
        ak.attend(q, k, v, method="combiner", row_summary="none", **kw)
    with pytest.raises(ak.OptionError, match="frames=4 must divide the 30"):
        ak.attend(q, k, v, method="rettention", frames=4, **kw)
    with pytest.raises(ak.OptionError, match="warmup only apply with state"):
        ak.attend(q, k, v, method="rettention", warmup=3, **kw)
    with pytest.raises(ak.OptionError, match="rho or state|rho and"):
        ak.attend(q, k, v, method="rettention", rho=1.0, state=rettention.RettentionState(), **kw)
    with pytest.raises(ak.OptionError, match=r"residual has shape \(30, 2\), which does not broadcast"):
        ak.attend(q, k, v, method="rettention", residual=torch.zeros(30, 2, dtype=q.dtype), **kw)
    with pytest.raises(ak.UnsupportedPatternError):
        ak.attend(q, k, v, is_causal=True, method="rettention", **kw)
    with pytest.raises(ak.UnsupportedPatternError):
        ak.attend(q, k, v, method="deltallm", **kw)
    assert combiner.LOCAL_SUMMARIES[0] == "identity-max"
