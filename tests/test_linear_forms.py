"""The three forms of every new linear / recurrent method agree — outputs and gradients, float64 to
1e-9 and float32 to 1e-4 (relative to the largest value) — and decoding states carry over: running
``forward_state`` piece by piece equals the full forward, the final states agree with an
independent token-by-token recurrence, and so do the gradients with respect to the initial state."""

import pytest
import torch

import attnkit as ak
from attnkit.api import _dispatch
from attnkit.call import PATTERNS
from attnkit.mechanisms.linear.aaren import AarenState
from attnkit.mechanisms.linear.based import BasedState, taylor_features
from attnkit.mechanisms.linear.flow import FlowState, recurrent_causal
from attnkit.mechanisms.linear.lightning import alibi_slopes
from attnkit.mechanisms.linear.lightnet import LightNetState
from attnkit.registry import get_method
from helpers import inputs, rel_err

METHODS = ["lightning", "based", "flow", "aaren", "lightnet"]
FORMS = ("chunked", "parallel", "recurrent")
TOL = {torch.float64: 1e-9, torch.float32: 1e-4}
OPTS = {"lightning": {"chunk_size": 8}, "based": {"chunk_size": 8}, "flow": {"chunk_size": 8},
        "aaren": {"chunk_size": 8}, "lightnet": {"chunk_size": 8, "initial_lse": 0.0}}


def _cases():
    for m in METHODS:
        for p in PATTERNS:
            if p in ak.method_info(m).patterns:
                yield m, p


@pytest.mark.parametrize("name,pattern", list(_cases()))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_forms_agree_outputs_and_gradients(name, pattern, dtype):
    causal = pattern.startswith("causal")
    lq, lk = (29, 29) if pattern.endswith("self") else (17, 29)
    q, k, v = inputs(B=2, H=4, Hkv=2, Lq=lq, Lk=lk, D=6, Dv=5, seed=1)
    w = torch.randn(2, 4, lq, 5, dtype=torch.float64)
    got = {}
    for form in FORMS:
        leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
        out = ak.attend(*leaves, is_causal=causal, enable_gqa=True, method=name, backend=form, **OPTS[name])
        grads = torch.autograd.grad((out * w.to(dtype)).sum(), leaves)
        got[form] = (out, *grads)
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]  # float64 parallel: the truth
    ref = ak.attend(*leaves, is_causal=causal, enable_gqa=True, method=name, backend="parallel", **OPTS[name])
    truth = (ref, *torch.autograd.grad((ref * w).sum(), leaves))
    for form, values in got.items():
        for what, a, b in zip(("out", "dq", "dk", "dv"), values, truth):
            assert a.dtype == dtype
            assert rel_err(a, b) <= TOL[dtype], (form, what, rel_err(a, b))


# -- decoding states ----------------------------------------------------------------------------
def _call(name, q, k, v, **opts):
    _, call, _, _ = _dispatch(q, k, v, None, 0.0, True, None, q.shape[1] != k.shape[1], name, "auto",
                              None, {**OPTS[name], **opts})
    return call


def _ref_lightning(call, S):
    q, (k, v) = call.query * call.scale, call.expanded_kv()
    lam = torch.exp(-torch.tensor(alibi_slopes(call.heads), dtype=q.dtype))[None, :, None, None]
    outs = []
    for t in range(q.shape[2]):
        S = lam * S + k[:, :, t, :, None] * v[:, :, t, None, :]
        outs.append(torch.einsum("bhd,bhde->bhe", q[:, :, t], S))
    return torch.stack(outs, 2), S


def _ref_based(call, st):
    (k, v), kv, z = call.expanded_kv(), st.kv, st.k_sum
    pq, pk = taylor_features(call.query, call.scale), taylor_features(k, call.scale)
    outs = []
    for t in range(pq.shape[2]):
        kv = kv + pk[:, :, t, :, None] * v[:, :, t, None, :]
        z = z + pk[:, :, t]
        num = torch.einsum("bhf,bhfe->bhe", pq[:, :, t], kv)
        outs.append(num / ((pq[:, :, t] * z).sum(-1) + call.options["eps"])[..., None])
    return torch.stack(outs, 2), BasedState(kv, z)


def _ref_flow(call, st):
    k, v = call.expanded_kv()
    return recurrent_causal(torch.sigmoid(call.query), torch.sigmoid(k), v, call, st)


def _ref_aaren(call, st):
    k, v = call.expanded_kv()
    s = (k @ call.query[:, :, :1].transpose(-1, -2))[..., 0] * call.scale
    m, u, w, outs = st.lse, torch.ones_like(st.lse), st.w[:, :, 0], []
    for t in range(s.shape[2]):
        m_new = torch.maximum(m, s[:, :, t])
        a, b = torch.exp(m - m_new), torch.exp(s[:, :, t] - m_new)
        u, w, m = u * a + b, w * a[..., None] + b[..., None] * v[:, :, t], m_new
        outs.append(w / u[..., None])
    return torch.stack(outs, 2), AarenState(m + torch.log(u), (w / u[..., None])[:, :, None])


def _ref_lightnet(call, st):
    q, (k, v) = call.query * call.scale, call.expanded_kv()
    S, z, outs = st.kv, st.lse, []
    for t in range(q.shape[2]):
        z_new = torch.logaddexp(z, k[:, :, t])
        S = torch.exp(z - z_new)[..., None] * S + torch.exp(k[:, :, t] - z_new)[..., None] * v[:, :, t, None, :]
        z = z_new
        outs.append(torch.einsum("bhd,bhde->bhe", q[:, :, t], S))
    return torch.stack(outs, 2), LightNetState(S, z)


def _random_state(name, B, H, D, Dv, g):
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).requires_grad_()  # noqa: E731
    if name == "lightning":
        return r(B, H, D, Dv)
    if name == "based":
        f = 1 + D + D * (D + 1) // 2
        return BasedState(r(B, H, f, Dv), (torch.rand(B, H, f, generator=g, dtype=torch.float64) * 3).requires_grad_())
    if name == "flow":
        pos = lambda *s: (torch.rand(*s, generator=g, dtype=torch.float64) * 5 + 1).requires_grad_()  # noqa: E731
        return FlowState(6, pos(B, H, D), pos(B, H, D), pos(B, H, D), pos(B, H, D), pos(B, H), r(B, H, D, Dv))
    if name == "aaren":
        return AarenState(r(B, H), r(B, H, 1, Dv))
    return LightNetState(r(B, H, D, Dv), r(B, H, D))


REFS = {"lightning": _ref_lightning, "based": _ref_based, "flow": _ref_flow, "aaren": _ref_aaren,
        "lightnet": _ref_lightnet}


def _tensors(state):
    if isinstance(state, torch.Tensor):
        return [state]
    return [t for t in vars(state).values() if isinstance(t, torch.Tensor)]


def _qkv(name, L, seed):
    q, k, v = inputs(B=2, H=4, Hkv=2, Lq=L, D=6, Dv=5, seed=seed)
    if name == "aaren":
        q = q[:, :, :1].expand(-1, -1, L, -1)
    return q, k, v


def _opts(name):
    return {"shared_query": True} if name == "aaren" else {}


@pytest.mark.parametrize("name", METHODS)
def test_state_chunk_by_chunk_equals_full_forward(name):
    impl = get_method(name)
    q, k, v = _qkv(name, 40, seed=2)
    full = ak.attend(q, k, v, is_causal=True, enable_gqa=True, method=name, **OPTS[name], **_opts(name))
    state = impl.init_state(2, 4, 6, 5, dtype=torch.float64, device="cpu", options={**OPTS[name], **_opts(name)})
    one_call = impl.forward_state(_call(name, q, k, v, **_opts(name)), state)[1]
    outs = []
    for a, b in ((0, 13), (13, 14), (14, 31), (31, 40)):
        out, state = impl.forward_state(_call(name, q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], **_opts(name)), state)
        outs.append(out)
    assert rel_err(torch.cat(outs, 2), full) <= 1e-10
    for a, b in zip(_tensors(state), _tensors(one_call)):
        assert rel_err(a, b) <= 1e-10


@pytest.mark.parametrize("name", METHODS)
def test_state_outputs_final_state_and_gradients_match_recurrence(name):
    """From a random initial state: chunked ``forward_state`` vs an independent token recurrence —
    outputs, final state, and gradients w.r.t. q, k, v and every initial-state tensor."""
    impl = get_method(name)
    g = torch.Generator().manual_seed(5)
    base = [t.detach().requires_grad_() for t in _qkv(name, 23, seed=3)]
    results = []
    for run in ("chunked", "reference"):
        state = _random_state(name, 2, 4, 6, 5, g.manual_seed(5))
        q = base[0][:, :, :1].expand(-1, -1, 23, -1) if name == "aaren" else base[0]
        call = _call(name, q, base[1], base[2], **_opts(name))
        out, final = impl.forward_state(call, state) if run == "chunked" else REFS[name](call, state)
        torch.manual_seed(0)
        loss = (out * torch.randn_like(out)).sum() + sum((t * torch.randn_like(t)).sum() for t in _tensors(final))
        grads = torch.autograd.grad(loss, base + _tensors(state), allow_unused=True)
        results.append((out, _tensors(final), grads))
    (o1, f1, g1), (o2, f2, g2) = results
    assert rel_err(o1, o2) <= 1e-10
    for a, b in zip(f1, f2):
        assert rel_err(a, b) <= 1e-10
    for a, b in zip(g1, g2):
        assert (a is None) == (b is None)
        if a is not None:
            assert rel_err(a, b) <= 1e-9


@pytest.mark.parametrize("name", METHODS)
def test_stepping_through_a_layer_equals_the_full_forward(name):
    torch.manual_seed(1)
    opts = {**OPTS[name], "chunk_size": 4} if name == "lightnet" else OPTS[name]
    layer = ak.nn.Attention(24, 4, kv_heads=2, method=name, causal=True, **opts).double()
    x = torch.randn(2, 21, 24, dtype=torch.float64)
    full = layer(x)
    cache = layer.init_cache(2)
    steps = [layer(x[:, :7], cache=cache)] + [layer(x[:, t:t + 1], cache=cache) for t in range(7, 21)]
    assert rel_err(torch.cat(steps, 1), full) <= 1e-10
