"""RAT: the three forms agree (outputs, gradients, states), the limits chunk_size = 1 / >= L, the
implicit map, decoding through the layer, and the checks on the gate."""

import math

import pytest
import torch

import attnkit as ak
from attnkit.api import _dispatch
from attnkit.mechanisms.linear import rat as R
from attnkit.nn.rope import apply_rope
from attnkit.registry import get_method
from helpers import inputs, rel_err


pytestmark = pytest.mark.usefixtures("one_thread")


def definition(q, k, v, f, C, scale, rope):
    """RAT written from the paper's description: explicit key/value sets, one softmax per query."""
    B, H, L, D = q.shape
    out = torch.zeros(B, H, L, v.shape[-1], dtype=torch.float64)
    hk, hv, ends = None, None, []
    for t in range(L):
        c = t // C
        g = f[:, :, t]
        hk = (1 - g) * k[:, :, t] + (g * hk if t % C else 0)
        hv = (1 - g) * v[:, :, t] + (g * hv if t % C else 0)
        rot = (lambda x, p: apply_rope(x[:, :, None], torch.tensor([p]))[:, :, 0]) if rope else (lambda x, p: x)
        keys = [rot(ek, j) for j, (ek, _) in enumerate(ends)] + [rot(hk, c)]
        vals = [ev for _, ev in ends] + [hv]
        s = torch.stack([(rot(q[:, :, t], c) * key).sum(-1) for key in keys], -1) * scale
        out[:, :, t] = (torch.softmax(s, -1)[..., None] * torch.stack(vals, 2)).sum(2)
        if (t + 1) % C == 0:
            ends.append((hk, hv))
    return out


def gates(shape, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.sigmoid(torch.randn(*shape, generator=g, dtype=torch.float64) * 2).to(dtype)


@pytest.mark.parametrize("C", [1, 3, 8, 40])
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("rope", [True, False])
def test_forms_equal_the_definition_and_each_other(C, per_channel, rope):
    q, k, v = inputs(B=2, H=4, Hkv=2, Lq=29, D=8, seed=C)
    f = gates((2, 4, 29, 8 if per_channel else 1), seed=C)
    want = definition(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), f, C, 8 ** -0.5, rope)
    for backend in ("chunked", "parallel", "recurrent"):
        got = ak.attend(q, k, v, is_causal=True, enable_gqa=True, method="rat", backend=backend,
                        chunk_size=C, forget=f, chunk_rope=rope)
        assert rel_err(got, want) <= 1e-12, backend


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-9), (torch.float32, 1e-4)])
def test_gradients_of_inputs_and_gate_agree_across_forms(dtype, tol):
    q, k, v = inputs(B=1, H=2, Hkv=1, Lq=21, D=6, grad=True)
    f = gates((1, 2, 21, 6)).requires_grad_()
    outs = {}
    for backend in ("recurrent", "chunked", "parallel"):
        args = [t.detach().to(dtype).requires_grad_() for t in (q, k, v, f)]
        out = ak.attend(*args[:3], is_causal=True, enable_gqa=True, method="rat", backend=backend,
                        chunk_size=4, forget=args[3])
        w = torch.ones_like(out).cumsum(-1).sin()
        outs[backend] = (out, torch.autograd.grad((out * w).sum(), args))
    ref_out, ref_grads = outs["recurrent"]
    if dtype == torch.float32:  # against float64
        q64 = [t.detach() for t in (q, k, v, f)]
        for t in q64:
            t.requires_grad_()
        ref_out = ak.attend(*q64[:3], is_causal=True, enable_gqa=True, method="rat", backend="recurrent",
                            chunk_size=4, forget=q64[3])
        ref_grads = torch.autograd.grad((ref_out * torch.ones_like(ref_out).cumsum(-1).sin()).sum(), q64)
    for backend, (out, grads) in outs.items():
        assert rel_err(out, ref_out) <= tol, backend
        assert all(rel_err(a, b) <= tol for a, b in zip(grads, ref_grads)), backend


def test_chunk_size_one_is_softmax_attention_and_a_long_chunk_is_a_gated_rnn():
    q, k, v = inputs(B=1, H=2, Hkv=2, Lq=17, D=8)
    f = 0.3
    pos = torch.arange(17)
    got = ak.attend(q, k, v, is_causal=True, method="rat", chunk_size=1, forget=f)
    want = ak.reference(apply_rope(q, pos), apply_rope(0.7 * k, pos), 0.7 * v, is_causal=True)
    assert rel_err(got, want) <= 1e-12
    rnn = ak.attend(q, k, v, is_causal=True, method="rat", chunk_size=100, forget=f)
    h, states = torch.zeros_like(v[:, :, 0]), []
    for t in range(17):
        h = f * h + (1 - f) * v[:, :, t]
        states.append(h)
    assert rel_err(rnn, torch.stack(states, 2)) <= 1e-12


def test_materialize_reproduces_the_output():
    q, k, v = inputs(B=2, H=4, Hkv=2, Lq=23, D=8)
    f = gates((2, 4, 23, 1))
    opts = dict(chunk_size=5, forget=f)
    impl, call, _, _ = _dispatch(q, k, v, None, 0.0, True, None, True, "rat", "auto", None, opts)
    A = impl.materialize(call)
    assert A.shape == (2, 4, 23, 23) and torch.equal(A.triu(1), torch.zeros_like(A))
    out = ak.attend(q, k, v, is_causal=True, enable_gqa=True, method="rat", **opts)
    assert rel_err(A @ v.repeat_interleave(2, 1), out) <= 1e-12
    _, call, _, _ = _dispatch(q, k, v, None, 0.0, True, None, True, "rat", "auto", None,
                              {"forget": gates((2, 4, 23, 8))})
    with pytest.raises(ak.OptionError, match="last dim 1"):
        impl.materialize(call)


def test_state_continuation_and_state_gradients():
    impl = get_method("rat")
    q, k, v = inputs(B=1, H=2, Hkv=2, Lq=30, D=6)
    f = gates((1, 2, 30, 6))
    full = ak.attend(q, k, v, is_causal=True, method="rat", chunk_size=4, forget=f)
    state = impl.init_state(1, 2, 6, 6, dtype=torch.float64, device="cpu", options={})
    parts = []
    for a, b in ((0, 3), (3, 4), (4, 13), (13, 16), (16, 30)):
        opts = {"chunk_size": 4, "forget": f[:, :, a:b]}
        _, call, _, _ = _dispatch(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], None, 0.0, True, None, False,
                                  "rat", "auto", None, opts)
        out, state = impl.forward_state(call, state)
        parts.append(out)
    assert rel_err(torch.cat(parts, 2), full) <= 1e-12
    # gradients w.r.t. an initial state in the middle of a chunk, through the final state
    mid = R.chunked(q[:, :, :10], k[:, :, :10], v[:, :, :10], f[:, :, :10], 4, 0.4, True,
                    R.fresh_state(1, 2, 6, 6, torch.float64, "cpu"))[1]
    leaves = [t.clone().requires_grad_() for t in (mid.key, mid.value, mid.end_keys, mid.end_values)]
    grads = {}
    for form in (R.chunked, R.recurrent):
        st = R.RATState(10, *leaves)
        out, end = form(q[:, :, 10:], k[:, :, 10:], v[:, :, 10:], f[:, :, 10:], 4, 0.4, True, st)
        loss = out.square().sum() + end.key.sum() + end.value.square().sum() + end.end_keys.sum() + end.end_values.sum()
        grads[form] = (out, end, torch.autograd.grad(loss, leaves))
    (o1, e1, g1), (o2, e2, g2) = grads.values()
    assert rel_err(o1, o2) <= 1e-12 and all(rel_err(a, b) <= 1e-12 for a, b in zip(g1, g2))
    assert all(rel_err(a, b) <= 1e-12 for a, b in zip((e1.key, e1.end_keys), (e2.key, e2.end_keys)))


def test_layer_decodes_in_uneven_chunks_and_forms_agree():
    torch.manual_seed(0)
    layer = ak.nn.Attention(32, 4, kv_heads=2, method="rat", causal=True, chunk_size=4).double()
    x = torch.randn(2, 21, 32, dtype=torch.float64)
    full = layer(x)
    cache = layer.init_cache(2)
    parts = [layer(x[:, a:b], cache=cache) for a, b in ((0, 3), (3, 4), (4, 9), (9, 10), (10, 21))]
    assert rel_err(torch.cat(parts, 1), full) <= 1e-9
    assert cache.position == 21 and cache.state.end_keys.shape[2] == 5
    inner = layer.inner
    assert inner.in_proj.out_features == 3 * 32 + 2 * 2 * 8  # z, x, g per head; q, k per group
    assert bool((inner.gate_bias >= 0).all() and (inner.gate_bias <= math.log(3) + 1e-12).all())
    w = torch.randn_like(full)
    params = list(layer.parameters())
    ref = torch.autograd.grad((full * w).sum(), params)
    inner.form = "recurrent"
    out = layer(x)
    assert rel_err(out, full) <= 1e-9
    assert all(rel_err(a, b) <= 1e-9 for a, b in zip(torch.autograd.grad((out * w).sum(), params), ref))


def test_rat_rejects_bad_gates_and_layers():
    q, k, v = inputs(B=1, H=2, Hkv=2, Lq=9, D=8, Dv=6)
    bad = [(1.0, "in \\(0, 1\\)"), ("x", "number in \\(0, 1\\) or a tensor"),
           (gates((1, 2, 8, 1)), "shape"), (gates((1, 2, 9, 8)), "D == Dv"),
           (torch.zeros(1, 2, 9, 1), "strictly inside")]
    for gate, match in bad:
        with pytest.raises(ak.OptionError, match=match):
            ak.attend(q, k, v, is_causal=True, method="rat", forget=gate)
    with pytest.raises(ak.OptionError, match="even head dim"):
        ak.attend(q[..., :7], k[..., :7], v, is_causal=True, method="rat")
    with pytest.raises(ak.UnsupportedPatternError):
        ak.attend(q, k, v, method="rat")
    with pytest.raises(ak.OptionError, match="layer learns"):
        ak.nn.Attention(16, 2, method="rat", causal=True, forget=0.5)
    with pytest.raises(ak.ArgumentError, match="causal"):
        ak.nn.Attention(16, 2, method="rat")
