"""sigmoid / softplus (activation attention) and moh (Mixture-of-Head layer).

- the reference forms and every CPU engine equal the definitions written out here with loops;
- the blocksparse activation engine equals the dense one (outputs and gradients), with and without
  a window, causal / noncausal / cross, bool and float masks; rows with no key give zeros;
- the Triton kernels under TRITON_INTERPRET=1 (skipped without Triton) against the reference;
- moh: gates, the balance loss on crafted routing, gradients, decode, option errors.
"""

import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import attnkit as ak
from helpers import inputs, rel_err

TIGHT = {torch.float64: 1e-10, torch.float32: 1e-5}


# -- definitions written out, one (query, key) pair at a time ---------------------------------
def _visible(i, j, Lq, Lk, causal, window):
    pos = i + Lk - Lq
    if causal and j > pos:
        return False
    if window is not None:
        left, right = (window - 1, 0) if causal else (window // 2, window // 2)
        return pos - left <= j <= pos + right
    return True


def sigmoid_by_loops(q, k, v, causal=False, bias=None, window=None, normalize="none"):
    B, H, Lq, D = q.shape
    Lk, group = k.shape[2], H // k.shape[1]
    b = -math.log(Lk) if bias is None else bias
    out = torch.zeros(B, H, Lq, v.shape[-1], dtype=torch.float64)
    for bi in range(B):
        for h in range(H):
            for i in range(Lq):
                n, acc = 0, torch.zeros(v.shape[-1], dtype=torch.float64)
                for j in range(Lk):
                    if _visible(i, j, Lq, Lk, causal, window):
                        s = float(q[bi, h, i] @ k[bi, h // group, j]) / math.sqrt(D)
                        acc += v[bi, h // group, j] / (1 + math.exp(-(s + b)))
                        n += 1
                div = {"none": 1, "count": n, "sqrt_count": math.sqrt(n)}[normalize]
                out[bi, h, i] = acc / div if n else 0.0
    return out


def softplus_by_loops(q, k, v, causal=False, length_scale=1.0, power=1.0, threshold=0.0, window=None):
    B, H, Lq, D = q.shape
    Lk, group = k.shape[2], H // k.shape[1]
    out = torch.zeros(B, H, Lq, v.shape[-1], dtype=torch.float64)
    for bi in range(B):
        for h in range(H):
            for i in range(Lq):
                keys = [j for j in range(Lk) if _visible(i, j, Lq, Lk, causal, window)]
                if not keys:
                    continue
                lam = length_scale * math.log(len(keys))
                p = [math.log1p(math.exp(lam * float(q[bi, h, i] @ k[bi, h // group, j]) / math.sqrt(D)))
                     for j in keys]
                a = [x / sum(p) for x in p]
                r = [max(x - threshold / len(keys), 0.0) ** power for x in a]
                out[bi, h, i] = sum(w / sum(r) * v[bi, h // group, j] for w, j in zip(r, keys))
    return out


LOOP_CASES = [
    ("sigmoid", {}, {}),
    ("sigmoid", {"sigmoid_bias": -0.5, "window": 5, "normalize": "count"},
     {"bias": -0.5, "window": 5, "normalize": "count"}),
    ("sigmoid", {"normalize": "sqrt_count"}, {"normalize": "sqrt_count"}),
    ("softplus", {}, {}),
    ("softplus", {"length_scale": 0.7, "reweight_power": 3.0, "reweight_threshold": 0.5, "window": 6},
     {"length_scale": 0.7, "power": 3.0, "threshold": 0.5, "window": 6}),
]


@pytest.mark.parametrize("name,opts,loop_opts", LOOP_CASES)
@pytest.mark.parametrize("causal,Lq,Lk", [(False, 9, 9), (True, 9, 9), (False, 5, 11), (True, 11, 6)])
def test_reference_and_engines_match_definition_by_loops(name, opts, loop_opts, causal, Lq, Lk):
    q, k, v = inputs(B=1, H=2, Hkv=1, Lq=Lq, Lk=Lk, D=6, Dv=3, seed=Lq + Lk)
    by_loops = {"sigmoid": sigmoid_by_loops, "softplus": softplus_by_loops}[name]
    want = by_loops(q, k, v, causal, **loop_opts)
    from attnkit.api import _dispatch

    impl, call, _, _ = _dispatch(q, k, v, None, 0.0, causal, None, True, name, "auto", None, opts)
    assert rel_err(impl.reference(call), want) < 1e-12
    for backend in ("blocksparse", "dense"):
        got = ak.attend(q, k, v, is_causal=causal, enable_gqa=True, method=name, backend=backend,
                        block_size=16, **opts)
        assert rel_err(got, want) < 1e-12, backend


# -- blocksparse activation engine == dense --------------------------------------------------
ENGINE_CASES = [
    ("sigmoid", {"sigmoid_bias": -2.0}), ("sigmoid", {"window": 9, "normalize": "count"}),
    ("sigmoid", {"qk_norm": True, "normalize": "sqrt_count", "window": 4}),
    ("softplus", {}), ("softplus", {"window": 9, "length_scale": 1.5}),
    ("softplus", {"reweight_power": 2.5}), ("softplus", {"reweight_power": 1.5, "reweight_threshold": 0.6, "window": 12}),
]


def _both_engines(name, opts, q, k, v, causal, mask=None):
    outs, grads = [], []
    w = torch.randn(q.shape[:3] + v.shape[-1:], generator=torch.Generator().manual_seed(3), dtype=q.dtype)
    for backend in ("blocksparse", "dense"):
        o = ak.attend(q, k, v, mask, is_causal=causal, enable_gqa=True, method=name, backend=backend, **opts)
        outs.append(o)
        grads.append(torch.autograd.grad((o * w).sum(), (q, k, v)))
    return outs, grads


@pytest.mark.parametrize("name,opts", ENGINE_CASES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("causal,Lq,Lk", [(False, 70, 70), (True, 70, 70), (False, 33, 90), (True, 90, 33)])
def test_blocksparse_engine_equals_dense(name, opts, dtype, causal, Lq, Lk):
    q, k, v = inputs(B=1, H=2, Hkv=1, Lq=Lq, Lk=Lk, D=16, Dv=8, dtype=dtype, grad=True, seed=1)
    (a, b), (ga, gb) = _both_engines(name, dict(opts, block_size=16), q, k, v, causal)
    assert rel_err(a, b) <= TIGHT[dtype]
    for x, y in zip(ga, gb):
        assert rel_err(x, y) <= TIGHT[dtype]


@pytest.mark.parametrize("name,opts", [("sigmoid", {"normalize": "count"}), ("softplus", {"reweight_power": 2.0})])
def test_masks_bool_and_float(name, opts):
    q, k, v = inputs(B=2, H=2, Hkv=2, Lq=40, Lk=40, D=8, grad=True, seed=4)
    g = torch.Generator().manual_seed(0)
    keep = torch.rand(2, 1, 40, 40, generator=g) < 0.6
    bias = torch.randn(2, 1, 40, 40, generator=g, dtype=torch.float64).masked_fill(~keep, float("-inf"))
    for mask in (keep, bias):
        (a, b), (ga, gb) = _both_engines(name, dict(opts, block_size=16), q, k, v, True, mask)
        assert rel_err(a, b) <= 1e-10
        assert all(rel_err(x, y) <= 1e-10 for x, y in zip(ga, gb))
    # a -inf bias is the same as a False in a bool mask (hidden, not counted in n_i)
    zero_bias = torch.zeros_like(bias).masked_fill(~keep, float("-inf"))
    with_bool = ak.attend(q, k, v, keep, is_causal=True, method=name, **opts)
    assert rel_err(ak.attend(q, k, v, zero_bias, is_causal=True, method=name, **opts), with_bool) < 1e-12


@pytest.mark.parametrize("name,opts", [("sigmoid", {"normalize": "count"}), ("sigmoid", {}),
                                       ("softplus", {}), ("softplus", {"reweight_power": 2.0, "reweight_threshold": 0.5})])
@pytest.mark.parametrize("backend", ["blocksparse", "dense"])
def test_rows_without_keys_are_zero_with_finite_gradients(name, opts, backend):
    q, k, v = inputs(B=1, H=2, Hkv=2, Lq=30, Lk=12, D=8, grad=True, seed=2)  # causal: rows 0..17 see nothing
    mask = torch.ones(1, 1, 30, 12, dtype=torch.bool)
    mask[..., 25, :] = False  # and row 25 sees nothing through the mask
    out = ak.attend(q, k, v, mask, is_causal=True, method=name, backend=backend, block_size=16, **opts)
    assert torch.equal(out[:, :, :18], torch.zeros_like(out[:, :, :18]))
    assert torch.equal(out[:, :, 25], torch.zeros_like(out[:, :, 25]))
    assert out[:, :, 18:25].abs().sum() > 0
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    assert all(torch.isfinite(g).all() for g in grads)
    assert float(grads[0][:, :, :18].abs().max()) == 0.0


def test_sigmoid_bias_defaults_to_minus_log_key_length_also_when_causal():
    q, k, v = inputs(B=1, H=2, Hkv=2, Lq=20, Lk=48, D=8, seed=6)
    for causal in (False, True):
        default = ak.attend(q, k, v, is_causal=causal, method="sigmoid")
        fixed = ak.attend(q, k, v, is_causal=causal, method="sigmoid", sigmoid_bias=-math.log(48))
        assert torch.equal(default, fixed)
    assert rel_err(default, sigmoid_by_loops(q, k, v, True)) < 1e-12


def test_sigmoid_with_zero_scores_is_n_over_n_plus_one_of_the_mean():
    """sigmoid(0 - log n) = 1 / (n + 1): the output is n / (n + 1) times the mean of v."""
    _, k, v = inputs(B=1, H=1, Hkv=1, Lq=7, Lk=7, D=8, seed=8)
    q = torch.zeros(1, 1, 7, 8, dtype=torch.float64)
    for backend in ("blocksparse", "dense"):
        out = ak.attend(q, k, v, method="sigmoid", backend=backend)
        assert rel_err(out[0, 0, 0], 7 / 8 * v[0, 0].mean(0)) < 1e-12
    torch.testing.assert_close(torch.sigmoid(torch.tensor(1.3)), 0.5 * (1 + torch.tanh(torch.tensor(0.65))))


def test_softplus_rows_sum_to_one_and_identity_reweighting_is_lssa():
    q, k, _ = inputs(B=1, H=2, Hkv=2, Lq=25, Lk=25, D=8, seed=9)
    ones = torch.ones(1, 2, 25, 1, dtype=torch.float64)
    for opts in ({}, {"reweight_power": 3.0, "reweight_threshold": 0.9}, {"window": 4}):
        for causal in (False, True):
            out = ak.attend(q, k, ones, is_causal=causal, method="softplus", **opts)
            torch.testing.assert_close(out, torch.ones_like(out), rtol=0, atol=1e-12)
    base = ak.attend(q, k, inputs(Lq=25, seed=1)[2][:1, :2], method="softplus")
    same = ak.attend(q, k, inputs(Lq=25, seed=1)[2][:1, :2], method="softplus", reweight_power=1.0,
                     reweight_threshold=0.0)
    assert torch.equal(base, same)


@pytest.mark.parametrize("backend", ["blocksparse", "dense"])
def test_softplus_no_overflow_for_huge_scores_in_bfloat16(backend):
    q = torch.full((1, 1, 16, 8), 100.0, dtype=torch.bfloat16)  # scores of 2.8e4
    k = torch.full((1, 1, 16, 8), 100.0, dtype=torch.bfloat16)
    v = torch.randn(1, 1, 16, 8).to(torch.bfloat16)
    out = ak.attend(q, k, v, method="softplus", backend=backend, reweight_power=2.0)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), v.float().mean(2, keepdim=True).expand_as(out), atol=2e-2, rtol=0)


def test_decoding_with_a_fixed_bias_equals_the_forward_and_default_bias_follows_the_cache():
    torch.manual_seed(0)
    x = torch.randn(1, 9, 16, dtype=torch.float64)
    for opts, equal in (({"sigmoid_bias": -2.0}, True), ({}, False)):
        layer = ak.nn.Attention(16, 2, method="sigmoid", causal=True, **opts).double()
        full = layer(x)
        cache = layer.init_cache(1)
        steps = torch.cat([layer(x[:, t:t + 1], cache=cache) for t in range(9)], 1)
        assert (rel_err(steps, full) < 1e-12) == equal


def test_option_errors_and_backend_reasons():
    q, k, v = inputs(B=1, H=2, Hkv=2, Lq=8, Lk=8, D=8)
    with pytest.raises(ak.OptionError, match="reweight_threshold"):
        ak.attend(q, k, v, method="softplus", reweight_threshold=1.0)
    with pytest.raises(ak.OptionError, match="reweight_power"):
        ak.attend(q, k, v, method="softplus", reweight_power=0.5)
    with pytest.raises(ak.OptionError, match="sigmoid_bias"):
        ak.attend(q, k, v, method="sigmoid", bias=-1.0)
    why = dict(ak.explain(q, k, v, method="sigmoid").candidates)
    assert why["blocksparse"] is None
    assert why["triton"] and ("Triton" in why["triton"] or "CUDA" in why["triton"] or "interpreter" in why["triton"])
    with pytest.raises(ak.BackendUnavailableError, match="triton"):
        ak.attend(q, k, v, method="softplus", backend="triton")


WINDOW_16K = textwrap.dedent("""
    import resource, sys, torch, attnkit as ak
    L = 16384
    q, k, v = (torch.randn(1, 1, L, 32, requires_grad=True) for _ in range(3))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for name, opts in {calls}:
        out = ak.attend(q, k, v, is_causal=True, method=name, window=257, **opts)
        {backward}
    print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)
""")


def _rss_growth_mib(calls, backward=True) -> float:
    script = WINDOW_16K.format(calls=calls, backward="out.sum().backward()" if backward else "pass")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr
    return float(proc.stdout.strip().splitlines()[-1])


def test_window_16k_on_cpu_never_builds_an_l_by_l_tensor():
    """fp32 forward at L = 16384, window 257 (tile density ~3%), in a subprocess."""
    assert _rss_growth_mib([("softplus", {})], backward=False) < 512  # one 16k x 16k fp32 matrix: 1 GiB


@pytest.mark.slow
def test_window_16k_forward_and_backward_every_variant():
    calls = [("sigmoid", {"normalize": "count"}), ("softplus", {}),
             ("softplus", {"reweight_power": 2.0, "reweight_threshold": 0.5})]
    assert _rss_growth_mib(calls) < 512


# -- Triton kernels in the CPU interpreter ------------------------------------------------------
TRITON_CASES = [
    ("sigmoid", {"sigmoid_bias": -3.0}, 64), ("sigmoid", {"normalize": "count", "qk_norm": True}, 64),
    ("softplus", {}, 64), ("softplus", {"reweight_power": 2.0, "reweight_threshold": 0.3}, 64),
    ("sigmoid", {}, 128),
]


@pytest.fixture(scope="module")
def interpreted_triton():
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"  # read by Triton at import and by attnkit at launch
    pytest.importorskip("triton")
    yield
    if old is None:
        os.environ.pop("TRITON_INTERPRET")
    else:
        os.environ["TRITON_INTERPRET"] = old


@pytest.mark.parametrize("name,opts,D", TRITON_CASES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_kernels_interpreted(interpreted_triton, name, opts, D, causal, dtype):
    Lq, Lk = (150, 70) if causal else (70, 150)
    g = torch.Generator().manual_seed(D + causal)
    q, k, v = (torch.randn(1, h, L, D, generator=g).to(dtype).requires_grad_()
               for h, L in ((2, Lq), (1, Lk), (1, Lk)))
    w = torch.randn(1, 2, Lq, D, generator=g)
    out = ak.attend(q, k, v, is_causal=causal, enable_gqa=True, method=name, backend="triton", **opts)
    grads = torch.autograd.grad((out.float() * w).sum(), (q, k, v))
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = ak.attend(q64, k64, v64, is_causal=causal, enable_gqa=True, method=name, backend="dense", **opts)
    want = torch.autograd.grad((ref * w.double()).sum(), (q64, k64, v64))
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert out.dtype == dtype and rel_err(out, ref) < tol
    for got, exp in zip(grads, want):
        assert got.dtype == dtype and rel_err(got, exp) < tol


@pytest.mark.parametrize("name,opts", [("sigmoid", {"sigmoid_bias": -2.0}), ("softplus", {"reweight_power": 3.0})])
def test_triton_decode_step_and_group_of_four(interpreted_triton, name, opts):
    """One query over 37 keys (a decode step), GQA 4:1, float32."""
    g = torch.Generator().manual_seed(5)
    q = torch.randn(2, 4, 1, 64, generator=g)
    k, v = (torch.randn(2, 1, 37, 64, generator=g) for _ in range(2))
    out = ak.attend(q, k, v, is_causal=True, enable_gqa=True, method=name, backend="triton", **opts)
    ref = ak.attend(q, k, v, is_causal=True, enable_gqa=True, method=name, backend="dense", **opts)
    assert rel_err(out, ref) < 1e-5


@pytest.mark.slow
def test_triton_kernels_compile_for_h100_without_spills():
    """Every variant compiles for sm_90 with wgmma products. Spills: none, except softplus's dk/dv
    kernel at D = 128 (up to 224 B per thread, Triton 3.6), the configuration measured in
    docs/results/h200/bench_softmax_free.md; the bound keeps it from growing."""
    pytest.importorskip("triton")
    script = os.path.join(os.path.dirname(__file__), "..", "scripts", "check_triton_compile.py")
    proc = subprocess.run([sys.executable, script, "--arch", "90", "--max-spill", "256"], capture_output=True,
                          text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


# -- moh ----------------------------------------------------------------------------------------
def _moh(heads=4, dim=16, **opts):
    torch.manual_seed(0)
    return ak.nn.Attention(dim, heads, method="moh", **opts).double()


def test_moh_gates_routed_sum_to_k_shared_sum_to_hs():
    from attnkit.mechanisms.heads.moh import head_gates

    layer = _moh(heads=8, shared_heads=3, routed_top_k=2).inner
    x = torch.randn(50, 16, dtype=torch.float64)
    g, p, mask = head_gates(x, layer.router, layer.shared, layer.balance, 3, 2)
    assert g.shape == (50, 8) and (g >= 0).all()
    assert torch.equal(mask.sum(-1), torch.full((50,), 2.0, dtype=torch.float64))
    assert ((g[:, 3:] > 0).sum(-1) == 2).all()
    a = torch.softmax(layer.balance(x), -1) * 2
    torch.testing.assert_close(g[:, 3:].sum(-1), a[:, 1] * 2)  # routed gates sum to k, times a_1
    torch.testing.assert_close(g[:, :3].sum(-1), a[:, 0] * 3)  # shared gates sum to h_s, times a_0
    torch.testing.assert_close(p.sum(-1), torch.ones(50, dtype=torch.float64))


def test_moh_all_shared_with_zero_router_is_standard_attention():
    layer = _moh(heads=4, shared_heads=4, routed_top_k=0)
    torch.nn.init.zeros_(layer.inner.shared.weight)  # softmax(0) * 4 = 1 for every head
    mha = ak.nn.Attention(16, 4).double()
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        getattr(mha, name).load_state_dict(getattr(layer.inner, name).state_dict())
    x = torch.randn(2, 9, 16, dtype=torch.float64)
    assert rel_err(layer(x), mha(x)) < 1e-13
    assert layer.inner.aux_loss is None


def test_moh_balance_loss_on_crafted_routing():
    from attnkit.mechanisms.heads.moh import balance_loss, head_gates

    E, k = 4, 2
    router = torch.nn.Linear(E, E, bias=False).double()
    torch.nn.init.eye_(router.weight)  # logits = x
    base = torch.tensor([3.0, 1.0, 0.0, -1.0], dtype=torch.float64)
    uniform = torch.stack([base.roll(i) for i in range(E)])  # every expert equally likely and chosen
    _, p, mask = head_gates(uniform, router, None, None, 0, k)
    torch.testing.assert_close(balance_loss(p, mask), torch.tensor(float(k), dtype=torch.float64))
    skewed = torch.stack([base, base, base.roll(1), base])
    _, p, mask = head_gates(skewed, router, None, None, 0, k)
    me = torch.softmax(skewed, -1).mean(0).tolist()
    ce = [(sum(1 for row in skewed if e in torch.topk(row, k).indices.tolist())) / 4 for e in range(E)]
    expected = E * sum(m * c for m, c in zip(me, ce))
    assert abs(float(balance_loss(p, mask).detach()) - expected) < 1e-12


def test_moh_gradients_reach_every_parameter_and_gradcheck():
    layer = _moh(heads=4, shared_heads=2, routed_top_k=1)
    x = torch.randn(2, 7, 16, dtype=torch.float64, requires_grad=True)
    out = layer(x)
    (out.square().mean() + 0.01 * layer.inner.aux_loss).backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    small = _moh(heads=2, dim=6, shared_heads=1, routed_top_k=1)
    x2 = torch.randn(1, 3, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: small(t), (x2,), eps=1e-6, atol=1e-6)


def test_moh_cross_attention_cache_and_inner_method():
    torch.manual_seed(1)
    layer = ak.nn.Attention(16, 4, method="moh", cross=True, context_dim=12, attention="sigmoid",
                            attention_options={"sigmoid_bias": -1.0}).double()
    x = torch.randn(2, 6, 16, dtype=torch.float64)
    ctx = torch.randn(2, 10, 12, dtype=torch.float64)
    full = layer(x, context=ctx)
    cache = layer.init_cache(2)
    steps = torch.cat([layer(x[:, :1], context=ctx, cache=cache)] + [layer(x[:, t:t + 1], cache=cache)
                                                                      for t in range(1, 6)], 1)
    assert rel_err(steps, full) < 1e-12


@pytest.mark.parametrize("opts,match", [
    ({"shared_heads": 5}, "shared_heads"), ({"shared_heads": 2, "routed_top_k": 3}, "routed_top_k"),
    ({"shared_heads": 1, "routed_top_k": 0}, "routed_top_k"), ({"attention": "moh"}, "functional"),
    ({"attention": "sigmod"}, "sigmoid"), ({"attention_options": {"windw": 3}, "attention": "sliding_window"}, "window"),
    ({"shared_head": 1}, "shared_heads")])
def test_moh_option_errors(opts, match):
    with pytest.raises(ak.AttnkitError, match=match):
        ak.nn.Attention(16, 4, method="moh", **opts)


def test_check_command_covers_the_new_methods():
    from typer.testing import CliRunner

    from attnkit.cli import app

    res = CliRunner().invoke(app, ["check", "sigmoid", "softplus", "moh", "--configs", "1"])
    assert res.exit_code == 0, res.stdout
    assert "sigmoid" in res.stdout and "softplus" in res.stdout and "moh" in res.stdout


def test_gpu_benchmark_script_runs_on_cpu_at_tiny_size(tmp_path):
    script = os.path.join(os.path.dirname(__file__), "..", "scripts", "gpu", "bench_softmax_free.py")
    env = {**os.environ, "PYTHONPATH": os.path.join(os.path.dirname(__file__), "..", "src")}
    proc = subprocess.run([sys.executable, script, "--tiny", "--out", str(tmp_path)], capture_output=True,
                          text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert (tmp_path / "bench_softmax_free.json").exists() and (tmp_path / "bench_softmax_free.md").exists()
