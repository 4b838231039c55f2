"""Every registered method, tested by being registered.

For each method and each pattern it claims: every backend that can run here agrees with the truth
(the float64 oracle with the method's mask for exact methods, the method's reference form for the
others) on random configurations; gradients agree too; awkward shapes; bf16; the causal-leak test;
patterns it does not claim raise UnsupportedPatternError; decode equals forward.
"""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import attnkit as ak
from attnkit.call import PATTERNS
from attnkit.models.blocks import takes_rope
from attnkit.registry import get_method
from helpers import functional_methods, inputs, rel_err, runnable_backends, sample, shape_for, truth

METHODS = functional_methods()
ALL = [i.name for i in ak.methods()]
TOL = {torch.float64: 1e-9, torch.float32: 1e-4}
EXACT_TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


def tol(name, dtype):
    return (EXACT_TOL if ak.method_info(name).kind == "exact" else TOL)[dtype]


def claimed(name):
    return [p for p in PATTERNS if p in ak.method_info(name).patterns]


CASES = [(m, p) for m in METHODS for p in claimed(m)]


@pytest.mark.parametrize("name", ALL)
def test_info_is_complete(name):
    info = ak.method_info(name)
    assert info.summary and info.patterns and info.family in "PDARNTB"
    assert info.kind in ("exact", "approximate", "layer")
    for opt in info.options:
        assert opt.doc, f"{name}.{opt.name} has no doc"
        opt.validate(opt.default, name) if opt.default is not None or opt.nullable else None
    assert sorted(ak.methods(), key=lambda i: i.name) == ak.methods()


@pytest.mark.parametrize("name,pattern", CASES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_backends_match_truth(name, pattern, dtype):
    causal = pattern.startswith("causal")
    for seed in range(3):
        Lq, Lk = shape_for(pattern, 63, 41 + 10 * seed)
        q, k, v = inputs(Lq=Lq, Lk=Lk, Dv=32, dtype=dtype, seed=seed)
        opts = sample(name, seed, Lq, Lk, heads=4, kv_heads=2, head_dim=48)
        want = truth(name, q, k, v, is_causal=causal, **opts)
        for backend in runnable_backends(name, q, k, v, causal, **opts):
            got = ak.attend(q, k, v, is_causal=causal, enable_gqa=True, method=name, backend=backend, **opts)
            assert got.shape == want.shape and got.dtype == dtype
            assert not torch.isnan(got).any(), (backend, opts)
            assert rel_err(got, want) <= tol(name, dtype), (backend, opts, rel_err(got, want))


@pytest.mark.parametrize("name,pattern", CASES)
def test_gradients_match_reference(name, pattern):
    causal = pattern.startswith("causal")
    Lq, Lk = shape_for(pattern, 21, 13)
    opts = sample(name, 7, Lq, Lk, heads=2, kv_heads=1, head_dim=8)
    q, k, v = inputs(B=1, H=2, Hkv=1, Lq=Lq, Lk=Lk, D=8, Dv=6, grad=True, seed=3)
    impl = get_method(name)
    ref = truth(name, q, k, v, is_causal=causal, **opts) if impl.info.kind != "exact" else None
    if ref is not None:  # the reference form must itself be differentiable: differentiate it directly
        from attnkit.api import _dispatch

        _, call, _, _ = _dispatch(q, k, v, None, 0.0, causal, None, True, name, "auto", None, opts)
        ref = impl.reference(call)
    else:
        from attnkit.api import _dispatch

        _, call, _, _ = _dispatch(q, k, v, None, 0.0, causal, None, True, name, "auto", None, opts)
        mask, bias = impl.oracle_inputs(call)
        ref = ak.reference(q, k, v, mask=mask, bias=bias, scale=call.scale)
    w = torch.randn_like(ref)
    want = torch.autograd.grad((ref * w).sum(), (q, k, v), allow_unused=True)
    for backend in runnable_backends(name, q, k, v, causal, **opts):
        out = ak.attend(q, k, v, is_causal=causal, enable_gqa=True, method=name, backend=backend, **opts)
        got = torch.autograd.grad((out * w).sum(), (q, k, v), allow_unused=True)
        for g, r, what in zip(got, want, "qkv"):
            if r is None:
                assert g is None or float(g.abs().max()) == 0
                continue
            assert rel_err(g, r) <= 1e-8, (backend, what, opts, rel_err(g, r))


@pytest.mark.parametrize("name", METHODS)
def test_gradcheck_float64(name):
    pattern = claimed(name)[0]
    causal = pattern.startswith("causal")
    Lq, Lk = shape_for(pattern, 7, 5)
    opts = sample(name, 1, Lq, Lk, heads=2, kv_heads=1, head_dim=4)
    q, k, v = inputs(B=1, H=2, Hkv=1, Lq=Lq, Lk=Lk, D=4, grad=True, seed=5)
    fn = lambda q, k, v: ak.attend(q, k, v, is_causal=causal, enable_gqa=True, method=name, **opts)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k, v), eps=1e-6, atol=1e-6)


AWKWARD = [
    dict(Lq=1, Lk=1, D=48), dict(Lq=63, Lk=63, D=48), dict(Lq=500, Lk=500, D=16, B=1, H=2, Hkv=1),
    dict(Lq=1, Lk=37, D=32), dict(Lq=37, Lk=19, D=32, Dv=8),
]


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("shape", AWKWARD, ids=lambda s: "-".join(f"{k}{v}" for k, v in s.items()))
def test_awkward_shapes(name, shape):
    info = ak.method_info(name)
    for causal in (False, True):
        pattern = ("causal" if causal else "noncausal") + ("-self" if shape["Lq"] == shape["Lk"] else "-cross")
        q, k, v = inputs(**{"B": 2, "H": 4, "Hkv": 2, **shape})
        opts = sample(name, 11, shape["Lq"], shape["Lk"], heads=q.shape[1], kv_heads=k.shape[1],
                      head_dim=q.shape[3])
        if pattern not in info.patterns:
            with pytest.raises(ak.UnsupportedPatternError, match=name):
                ak.attend(q, k, v, is_causal=causal, enable_gqa=True, method=name, **opts)
            continue
        got = ak.attend(q, k, v, is_causal=causal, enable_gqa=True, method=name, **opts)
        assert rel_err(got, truth(name, q, k, v, is_causal=causal, **opts)) <= tol(name, torch.float64)


@pytest.mark.parametrize("name,pattern", CASES)
def test_bfloat16(name, pattern):
    causal = pattern.startswith("causal")
    Lq, Lk = shape_for(pattern, 63, 50)
    q, k, v = inputs(Lq=Lq, Lk=Lk, dtype=torch.bfloat16, seed=2)
    opts = sample(name, 2, Lq, Lk, heads=4, kv_heads=2, head_dim=48)
    got = ak.attend(q, k, v, is_causal=causal, enable_gqa=True, method=name, **opts)
    assert got.dtype == torch.bfloat16 and torch.isfinite(got).all()
    assert rel_err(got, truth(name, q, k, v, is_causal=causal, **opts)) < 5e-2


@pytest.mark.parametrize("name,pattern", [(m, p) for m, p in CASES if p.startswith("causal")])
def test_causal_leak(name, pattern):
    """CAB's pattern-validity test: changing future queries, keys or values never changes the
    outputs of earlier queries."""
    Lq, Lk = shape_for(pattern, 40, 52)
    off = Lk - Lq
    opts = sample(name, 4, Lq, Lk, heads=4, kv_heads=2, head_dim=48)
    q, k, v = inputs(Lq=Lq, Lk=Lk, seed=9)
    base = ak.attend(q, k, v, is_causal=True, enable_gqa=True, method=name, **opts)
    for t in (0, Lq // 2, Lq - 2):
        q2, k2, v2 = q.clone(), k.clone(), v.clone()
        q2[:, :, t + 1:] = torch.randn_like(q2[:, :, t + 1:]) * 3
        k2[:, :, t + 1 + off:] = torch.randn_like(k2[:, :, t + 1 + off:]) * 3
        v2[:, :, t + 1 + off:] = torch.randn_like(v2[:, :, t + 1 + off:]) * 3
        out = ak.attend(q2, k2, v2, is_causal=True, enable_gqa=True, method=name, **opts)
        assert torch.allclose(out[:, :, : t + 1], base[:, :, : t + 1], atol=1e-12, rtol=0), (t, opts)


@pytest.mark.parametrize("name", METHODS)
def test_two_configurations_in_one_process(name):
    q, k, v = inputs(Lq=40, Hkv=4)
    pattern = claimed(name)[0]
    causal = pattern.startswith("causal")
    if pattern.endswith("cross"):
        k, v = k[:, :, :29], v[:, :, :29]
    outs = []
    for seed in (21, 22, 21):
        opts = sample(name, seed, q.shape[2], k.shape[2], heads=4, kv_heads=4, head_dim=48)
        got = ak.attend(q, k, v, is_causal=causal, method=name, **opts)
        assert rel_err(got, truth(name, q, k, v, is_causal=causal, **opts)) <= tol(name, torch.float64)
        outs.append(got)
    assert torch.equal(outs[0], outs[2])


@pytest.mark.parametrize("name", [m for m in ALL if ak.method_info(m).decode])
def test_decode_equals_forward(name):
    info = ak.method_info(name)
    if "causal-self" not in info.patterns:
        pytest.skip("decode is for causal self-attention")
    torch.manual_seed(0)
    opts = sample(name, 3, 19, 19, heads=4, kv_heads=2, head_dim=8)
    layer = ak.nn.Attention(32, 4, kv_heads=2, method=name, causal=True, rope=takes_rope(name, **opts), **opts).double()
    x = torch.randn(2, 19, 32, dtype=torch.float64)
    full = layer(x)
    cache = layer.init_cache(2)
    parts = [layer(x[:, :5], cache=cache)] + [layer(x[:, t:t + 1], cache=cache) for t in range(5, 19)]
    assert rel_err(torch.cat(parts, 1), full) < 1e-9


@given(data=st.data())
@pytest.mark.parametrize("name", METHODS)
def test_property_random_shapes_and_options(name, data):
    info = ak.method_info(name)
    pattern = data.draw(st.sampled_from(claimed(name)))
    causal = pattern.startswith("causal")
    Hkv = data.draw(st.sampled_from([1, 2]))
    H = Hkv * data.draw(st.sampled_from([1, 2, 3]))
    Lq = data.draw(st.integers(1, 70))
    Lk = Lq if pattern.endswith("self") else data.draw(st.integers(1, 70).filter(lambda x: x != Lq))
    D = data.draw(st.sampled_from([4, 8, 12]))
    seed = data.draw(st.integers(0, 2**16))
    q, k, v = inputs(B=data.draw(st.integers(1, 2)), H=H, Hkv=Hkv, Lq=Lq, Lk=Lk, D=D, seed=seed)
    opts = sample(name, seed, Lq, Lk, heads=H, kv_heads=Hkv, head_dim=D)
    got = ak.attend(q, k, v, is_causal=causal, enable_gqa=True, method=name, **opts)
    assert rel_err(got, truth(name, q, k, v, is_causal=causal, **opts)) <= tol(name, torch.float64)
    del info
