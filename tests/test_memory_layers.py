"""Test-time-memory layers (titans, moneta, yaad, memora) and their shared engine.

What must agree, and why:
- the three forms (chunked / parallel / recurrent) compute one function for every chunk size:
  outputs, gradients (inputs, gates, initial state) and final states agree to 1e-9 in float64;
- each form equals an independent token loop written from the papers' equations in which the
  gradient of the inner loss is taken by autograd at the chunk-start weights (chunk semantics);
- ``chunk_size=1`` is the exact per-token recurrence; the paper's chunked approximation differs from
  it for larger chunks (checked to differ, not to agree);
- the closed forms the papers give: delta rule, resets, simplex weights, bounded Huber updates;
- decoding through ``ak.nn.Attention`` in uneven chunks equals the full forward.
"""

import math
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

import attnkit as ak
from attnkit.mechanisms.linear import _memory as M
from attnkit.mechanisms.linear.moneta import lp_grad, lq_normalize
from attnkit.mechanisms.linear.titans import window_attention
from attnkit.mechanisms.linear.yaad import huber_grad
from helpers import rel_err

MEMORY_METHODS = ["titans", "moneta", "yaad", "memora"]


pytestmark = pytest.mark.usefixtures("one_thread")


# -- an independent reference: autograd gradients at the chunk-start weights ---------------------
def ref_mlp(W, x):
    h = x
    for i, w in enumerate(W):
        h = torch.einsum("...oi,...ti->...to", w, F.gelu(h) if i else h)
    return h if len(W) == 1 else x + F.layer_norm(h, h.shape[-1:])


def reference(init, q, k, v, theta, rho, mu, loss, phi, chunk, read, extra=None):
    """Token loop from the equations; ``loss(out, v, t) -> (...,)`` is the inner loss."""
    Z = list(init)
    S = [torch.zeros_like(z) for z in Z]
    outs = []
    for t in range(k.shape[2]):
        if t % chunk == 0:
            anchor = [phi(z) for z in Z]
        out = ref_mlp([a[:, :] for a in anchor], k[:, :, t:t + 1])
        G = torch.autograd.grad(loss(out, v[:, :, t:t + 1], t).sum(), anchor, create_graph=True)
        S = [mu[:, :, t, None, None] * s - theta[:, :, t, None, None] * g for s, g in zip(S, G)]
        Z = [rho[:, :, t, None, None] * z + s for z, s in zip(Z, S)]
        W = anchor if read == "chunk" else [phi(z) for z in Z]
        outs.append(ref_mlp([w[:, :, None] for w in W], q[:, :, :, t:t + 1]))
    return torch.cat(outs, 3), Z


IDENTITY = lambda z: z  # noqa: E731


def _rules(delta):
    """name -> (engine rule, inner loss for the reference, phi)."""
    q4 = lq_normalize(4.0)
    return {
        "titans": (M.Rule("t", lambda e, x: 2 * e), lambda o, v, t: ((o - v) ** 2).sum(-1), IDENTITY),
        "moneta": (M.Rule("m", lp_grad(3.0, False), phi=q4), lambda o, v, t: (o - v).abs().pow(3).sum(-1), q4),
        "yaad": (M.Rule("y", huber_grad),
                 lambda o, v, t: torch.where((o - v).norm(dim=-1) <= delta[:, :, t, None],
                                             0.5 * ((o - v) ** 2).sum(-1),
                                             delta[:, :, t, None] * (o - v).abs().sum(-1)), IDENTITY),
        "memora": (M.Rule("c", lambda e, x: e, phi=lambda z: 2.0 * torch.softmax(z, -1)),
                   lambda o, v, t: 0.5 * ((o - v) ** 2).sum(-1), lambda z: 2.0 * torch.softmax(z, -1)),
    }


def _problem(depth, dtype=torch.float64, B=2, Hkv=2, g=2, L=13, D=5, hidden=7, seed=0, lr=0.4):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    u = lambda *s: torch.rand(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    dims = [D] + [hidden] * (depth - 1) + [D]
    init = [r(B, Hkv, o, i) / math.sqrt(i) for i, o in zip(dims[:-1], dims[1:])]
    q = F.normalize(r(B, Hkv, g, L, D), dim=-1)
    k = F.normalize(r(B, Hkv, L, D), dim=-1)
    v = r(B, Hkv, L, D)
    theta, rho, mu = lr * u(B, Hkv, L), 1 - 0.3 * u(B, Hkv, L), u(B, Hkv, L)
    delta = 0.5 + 2 * u(B, Hkv, L)
    leaves = [t.to(dtype).requires_grad_() for t in (q, k, v, theta, rho, mu, *init)]
    return leaves, delta.to(dtype)


def _run(form, rule, leaves, delta, chunk, read, momentum=True):
    q, k, v, theta, rho, mu, *init = leaves
    mu = mu if momentum else torch.zeros_like(mu)
    state = M.MemoryState(0, init, [torch.zeros_like(z) for z in init], rule.weights(init))
    return M.FORMS[form](state, q, k, v, (theta, rho, mu), {"delta": delta}, rule, chunk, read)


@pytest.mark.parametrize("name", list(_rules(None)))
@pytest.mark.parametrize("depth,chunk,read", [(1, 4, "token"), (2, 1, "token"), (2, 5, "token"),
                                              (2, 3, "chunk"), (3, 4, "token")])
def test_forms_equal_autograd_reference_outputs_and_gradients(name, depth, chunk, read):
    leaves, delta = _problem(depth, seed=depth + chunk)
    rule, loss, phi = _rules(delta)[name]
    momentum = name == "titans"
    q, k, v, theta, rho, mu, *init = leaves
    want, want_z = reference(init, q, k, v, theta, rho, mu if momentum else 0 * mu, loss, phi, chunk, read)
    w = torch.randn_like(want)
    gw = torch.autograd.grad((want * w).sum() + sum(z.sum() for z in want_z), leaves, allow_unused=True)
    for form in M.FORMS:
        got, state = _run(form, rule, leaves, delta, chunk, read, momentum)
        assert rel_err(got, want) <= 1e-9, (form, rel_err(got, want))
        assert all(rel_err(a, b) <= 1e-9 for a, b in zip(state.Z, want_z))
        gg = torch.autograd.grad((got * w).sum() + sum(z.sum() for z in state.Z), leaves, allow_unused=True)
        for a, b in zip(gg, gw):
            if a is None or b is None:  # mu without momentum
                assert all(t is None or float(t.abs().max()) == 0 for t in (a, b))
            else:
                assert rel_err(a, b) <= 1e-9, (form, rel_err(a, b))


@pytest.mark.parametrize("name", list(_rules(None)))
def test_forms_agree_in_float32(name):
    """Memora's depth-2 memory is ill-conditioned in float32 (rows of W on the simplex average the
    hidden units, LN then divides by their tiny spread: even the float32 recurrent form is 1e-4 off
    float64), so its float32 check uses the linear memory; depth 2 is checked in float64 above."""
    leaves64, delta = _problem(1 if name == "memora" else 2, seed=3, lr=0.2)
    rule, _, _ = _rules(delta)[name]
    want, _ = _run("recurrent", rule, leaves64, delta, 4, "token")
    w = torch.randn_like(want)
    gw = torch.autograd.grad((want * w).sum(), leaves64)
    leaves32 = [t.detach().float().requires_grad_() for t in leaves64]
    for form in M.FORMS:
        got, _ = _run(form, rule, leaves32, delta.float(), 4, "token")
        assert got.dtype == torch.float32 and rel_err(got, want) <= 1e-4, (form, rel_err(got, want))
        gg = torch.autograd.grad((got * w.float()).sum(), leaves32)
        assert all(rel_err(a, b) <= 1e-4 for a, b in zip(gg, gw)), form


def test_state_gradients_and_continuation_across_uneven_segments():
    """From a non-trivial initial state (Z, S, mid-chunk anchor) all forms give the same outputs,
    final state and gradients w.r.t. the initial state; segments of any length chain exactly."""
    leaves, delta = _problem(2, seed=7)
    rule, _, _ = _rules(delta)["titans"]
    q, k, v, theta, rho, mu, *init = [t.detach() for t in leaves]
    gates = (theta, rho, mu)
    cut = lambda a, b: (q[:, :, :, a:b], k[:, :, a:b], v[:, :, a:b], tuple(x[:, :, a:b] for x in gates))  # noqa: E731
    fresh = M.MemoryState(0, init, [torch.zeros_like(z) for z in init], init)
    _, mid = M.chunked(fresh, *cut(0, 6), {}, rule, 4, "token")  # position 6: inside a chunk
    start = M.MemoryState(6, *[[t.clone().requires_grad_() for t in ts] for ts in (mid.Z, mid.S, mid.anchor)])
    leaves0 = start.Z + start.S + start.anchor
    results = {}
    for form in M.FORMS:
        y, end = M.FORMS[form](start, *cut(6, 13), {}, rule, 4, "token")
        loss = y.square().sum() + sum((z * z).sum() for z in end.Z) + sum(s.sum() for s in end.S)
        results[form] = (y, end, torch.autograd.grad(loss, leaves0))
    y0, end0, g0 = results["recurrent"]
    for form, (y, end, g) in results.items():
        assert rel_err(y, y0) <= 1e-9 and all(rel_err(a, b) <= 1e-9 for a, b in zip(end.Z + end.S, end0.Z + end0.S))
        assert all(rel_err(a, b) <= 1e-9 for a, b in zip(g, g0)), form
    full, _ = M.chunked(fresh, *cut(0, 13), {}, rule, 4, "token")
    state, parts = fresh, []
    for a, b in ((0, 1), (1, 2), (2, 9), (9, 13)):
        y, state = M.chunked(state, *cut(a, b), {}, rule, 4, "token")
        parts.append(y)
    assert rel_err(torch.cat(parts, 3), full) <= 1e-12


def test_chunk_size_one_is_the_per_token_rule_and_larger_chunks_differ():
    leaves, delta = _problem(2, seed=1)
    rule, loss, phi = _rules(delta)["titans"]
    q, k, v, theta, rho, mu, *init = leaves
    exact, _ = reference(init, q, k, v, theta, rho, mu, loss, phi, 1, "token")
    one, _ = _run("chunked", rule, leaves, delta, 1, "token")
    four, _ = _run("chunked", rule, leaves, delta, 4, "token")
    assert rel_err(one, exact) <= 1e-9
    assert rel_err(four, exact) > 1e-3  # the mini-batch approximation is a different function


def test_linear_memory_without_momentum_and_decay_is_the_delta_rule():
    leaves, delta = _problem(1, seed=2)
    q, k, v, theta, *_ = [t.detach() for t in leaves]
    B, Hkv, L, D = k.shape
    rule = M.Rule("t", lambda e, x: 2 * e)
    W0 = torch.zeros(B, Hkv, D, D, dtype=torch.float64)
    state = M.MemoryState(0, [W0], [torch.zeros_like(W0)], [W0])
    ones, zeros = torch.ones_like(theta), torch.zeros_like(theta)
    got, _ = M.chunked(state, q, k, v, (theta, ones, zeros), {}, rule, 1, "token")
    W, outs = W0, []
    for t in range(L):
        kt, vt = k[:, :, t, :, None], v[:, :, t, :, None]
        W = W - theta[:, :, t, None, None] * 2 * (W @ kt - vt) @ kt.transpose(-1, -2)  # DeltaNet, beta = 2 theta
        outs.append((W[:, :, None] @ q[:, :, :, t, :, None])[..., 0])
    assert rel_err(got, torch.stack(outs, 3)) <= 1e-12


def test_full_forgetting_keeps_only_the_last_surprise():
    """alpha = 1 (rho = 0), no momentum: M_t = -theta_t grad(M_{t-1}; k_t, v_t), the past is erased."""
    leaves, delta = _problem(1, seed=4)
    q, k, v, theta, *_ = [t.detach() for t in leaves]
    rule = M.Rule("t", lambda e, x: 2 * e)
    W0 = torch.randn(*k.shape[:2], k.shape[-1], k.shape[-1], dtype=torch.float64)
    state = M.MemoryState(0, [W0], [torch.zeros_like(W0)], [W0])
    zeros = torch.zeros_like(theta)
    gates = (theta, zeros, zeros)
    _, before = M.chunked(state, q[:, :, :, :-1], k[:, :, :-1], v[:, :, :-1], tuple(g[:, :, :-1] for g in gates),
                          {}, rule, 1, "token")
    _, end = M.chunked(state, q, k, v, gates, {}, rule, 1, "token")
    W, kt, vt = before.Z[0], k[:, :, -1, :, None], v[:, :, -1, :, None]
    want = -theta[:, :, -1, None, None] * 2 * (W @ kt - vt) @ kt.transpose(-1, -2)
    assert rel_err(end.Z[0], want) <= 1e-12


def test_memorisation_decreases_the_loss_monotonically():
    gen = torch.Generator().manual_seed(0)
    D, n = 6, 4
    keys = F.normalize(torch.randn(1, 1, n, D, generator=gen, dtype=torch.float64), dim=-1)
    vals = torch.randn(1, 1, n, D, generator=gen, dtype=torch.float64)
    rule = M.Rule("t", lambda e, x: 2 * e)
    W = torch.zeros(1, 1, D, D, dtype=torch.float64)
    state = M.MemoryState(0, [W], [torch.zeros_like(W)], [W])
    k, v = keys.repeat(1, 1, 30, 1), vals.repeat(1, 1, 30, 1)
    gates = (torch.full((1, 1, 30 * n), 0.05, dtype=torch.float64), torch.ones(1, 1, 30 * n, dtype=torch.float64),
             torch.zeros(1, 1, 30 * n, dtype=torch.float64))
    losses = []
    for r in range(30):
        sl = slice(r * n, (r + 1) * n)
        _, state = M.chunked(state, k[:, :, None, sl], k[:, :, sl], v[:, :, sl], tuple(x[:, :, sl] for x in gates),
                             {}, rule, n, "token")
        losses.append(float(((keys @ state.Z[0].transpose(-1, -2) - vals) ** 2).sum()))
    assert all(b < a for a, b in zip(losses, losses[1:])) and losses[-1] < 0.5 * losses[0]


def test_moneta_p_q_two_is_the_decayed_delta_rule_and_smooth_surrogates():
    e = torch.linspace(-2, 2, 41, dtype=torch.float64)
    assert torch.allclose(lp_grad(2.0, False)(e, {}), 2 * e)
    smooth = lp_grad(3.0, True)(e, {})
    assert torch.allclose(smooth, 3 * torch.tanh(10 * e) * (e * e + 1e-6), atol=0)
    assert rel_err(smooth[e.abs() > 0.5], lp_grad(3.0, False)(e, {})[e.abs() > 0.5]) < 1e-3
    A = torch.randn(2, 3, 4, dtype=torch.float64)
    assert torch.equal(lq_normalize(2.0)(A), A / (A.abs().pow(2).sum((-1, -2), keepdim=True) + 1e-12) ** 0)
    W4 = lq_normalize(4.0)(A)
    assert torch.allclose(W4 * (A ** 4).sum((-1, -2), keepdim=True).sqrt(), A)
    leaves, delta = _problem(1, seed=5)
    q, k, v, theta, rho, *_ = [t.detach() for t in leaves]
    B, Hkv, L, D = k.shape
    W0 = torch.randn(B, Hkv, D, D, dtype=torch.float64)
    rule = M.Rule("m", lp_grad(2.0, False), phi=lq_normalize(2.0))
    got, _ = M.chunked(M.MemoryState(0, [W0], [0 * W0], [W0]), q, k, v, (theta, rho, 0 * rho), {}, rule, 1, "token")
    W, outs = W0, []
    for t in range(L):
        kt, vt = k[:, :, t, :, None], v[:, :, t, :, None]
        W = rho[:, :, t, None, None] * W - 2 * theta[:, :, t, None, None] * (W @ kt - vt) @ kt.transpose(-1, -2)
        outs.append((W[:, :, None] @ q[:, :, :, t, :, None])[..., 0])
    assert rel_err(got, torch.stack(outs, 3)) <= 1e-12


def test_yaad_bounds_outlier_updates_and_is_l2_for_a_large_delta():
    e = torch.tensor([[[[30.0, -40.0, 1.0]]]], dtype=torch.float64)
    delta = torch.full((1, 1, 1), 0.5, dtype=torch.float64)
    g = huber_grad(e, {"delta": delta})
    assert torch.equal(g, 0.5 * torch.sign(e)) and float(g.norm()) <= 0.5 * math.sqrt(3)
    assert torch.equal(huber_grad(e, {"delta": torch.full((1, 1, 1), 1e9, dtype=torch.float64)}), e)


def test_memora_weights_stay_on_the_scaled_simplex():
    torch.manual_seed(0)
    layer = ak.nn.Attention(16, 2, method="memora", causal=True, scale=2.0, chunk_size=3).double()
    cache = layer.init_cache(1)
    layer(torch.randn(1, 11, 16, dtype=torch.float64), cache=cache)
    mem = cache.state["memory"]
    for Wt in layer.inner.rule().weights(mem.Z) + mem.anchor:
        assert bool((Wt >= 0).all()) and torch.allclose(Wt.sum(-1), torch.full_like(Wt.sum(-1), 2.0))


# -- layers --------------------------------------------------------------------------------
LAYER_CASES = [("titans", {"variant": "lmm"}), ("titans", {"variant": "mag", "window": 3}),
               ("titans", {"variant": "mal", "window": 5, "persistent_tokens": 0}),
               ("moneta", {}), ("yaad", {"memory_depth": 1}), ("memora", {})]


@pytest.mark.parametrize("name,opts", LAYER_CASES, ids=lambda x: str(x))
def test_layer_decode_in_uneven_chunks_and_forms_agree(name, opts):
    torch.manual_seed(0)
    layer = ak.nn.Attention(24, 4, kv_heads=2, method=name, causal=True, chunk_size=4, **opts).double()
    x = torch.randn(2, 17, 24, dtype=torch.float64)
    full = layer(x)
    cache = layer.init_cache(2)
    parts = [layer(x[:, a:b], cache=cache) for a, b in ((0, 3), (3, 4), (4, 11), (11, 12), (12, 17))]
    assert rel_err(torch.cat(parts, 1), full) <= 1e-9
    params = [p for p in layer.parameters() if p.numel()]
    w = torch.randn_like(full)
    ref = torch.autograd.grad((full * w).sum(), params, allow_unused=True)
    for form in ("parallel", "recurrent"):
        layer.inner.form = form
        out = layer(x)
        assert rel_err(out, full) <= 1e-9, form
        got = torch.autograd.grad((out * w).sum(), params, allow_unused=True)
        assert all((a is None) == (b is None) and (a is None or rel_err(a, b) <= 1e-9) for a, b in zip(got, ref))


@pytest.mark.parametrize("name", MEMORY_METHODS)
def test_layer_is_causal_and_float32_close_to_float64(name):
    torch.manual_seed(1)
    layer = ak.nn.Attention(16, 2, method=name, causal=True, chunk_size=3)
    x = torch.randn(1, 12, 16)
    base = layer(x)
    x2 = x.clone()
    x2[:, 7:] += 3
    assert torch.equal(layer(x2)[:, :7], base[:, :7])
    assert rel_err(base, layer.double()(x.double())) <= 1e-4


def test_window_attention_equals_a_dense_masked_reference():
    gen = torch.Generator().manual_seed(0)
    B, H, L, D = 1, 2, 23, 4
    q, k, v = (torch.randn(B, H, L, D, generator=gen, dtype=torch.float64) for _ in range(3))
    i, j = torch.arange(L)[:, None], torch.arange(L)[None, :]
    for W, P in ((5, 3), (5, 0), (1, 2), (30, 0)):
        keep = (j <= i) & ((j < P) | (j > i - W))
        want = ak.reference(q, k, v, mask=keep, scale=0.5)
        empty = (k[:, :, :0],) * 4
        full, _ = window_attention(q, k, v, 0, W, P, 0.5, empty)
        past, parts = empty, []
        for a, b in ((0, 2), (2, 3), (3, 9), (9, 10), (10, 23)):
            y, past = window_attention(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], a, W, P, 0.5, past)
            parts.append(y)
        assert rel_err(full, want) <= 1e-12 and rel_err(torch.cat(parts, 2), want) <= 1e-12, (W, P)
        assert past[2].shape[2] == min(W - 1, L - P) and past[0].shape[2] == P


def test_memory_layers_reject_bad_configurations():
    with pytest.raises(ak.ArgumentError, match="causal"):
        ak.nn.Attention(16, 2, method="titans")
    with pytest.raises(ak.OptionError, match="variant"):
        ak.nn.Attention(16, 2, method="titans", causal=True, variant="mac")
    with pytest.raises(ak.ShapeError, match="even head_dim"):
        ak.nn.Attention(15, 3, method="titans", causal=True)
    with pytest.raises(ak.ArgumentError, match="owns parameters"):
        q = torch.randn(1, 1, 4, 8)
        ak.attend(q, q, q, is_causal=True, method="yaad")
    with pytest.raises(ak.OptionError, match="chunk_size"):
        ak.nn.Attention(16, 2, method="moneta", causal=True, chunk_size=0)


# -- models and memory -----------------------------------------------------------------------
LM_CASES = [("rat", {}), ("titans", {}), ("titans", {"variant": "lmm"}), ("titans", {"variant": "mal"}),
            ("moneta", {}), ("yaad", {}), ("memora", {}), ("gated_cnn", {})]


@pytest.mark.parametrize("name,opts", LM_CASES, ids=lambda x: str(x))
def test_two_layer_causal_lm_trains_a_few_steps_without_nan(name, opts):
    """The benchmark's use: ``ak.models.CausalLM(vocab, method=NAME)`` (dim 64, 2 layers, 4 heads)."""
    torch.manual_seed(0)
    lm = ak.models.CausalLM(40, method=name, **opts)
    opt = torch.optim.Adam(lm.parameters(), lr=3e-3)
    x = torch.randint(0, 40, (4, 17))
    losses = []
    for _ in range(3):
        loss = F.cross_entropy(lm(x[:, :-1]).reshape(-1, 40), x[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in lm.parameters() if p.grad is not None)
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
    assert lm.generate(x[:, :3], 4).shape == (4, 7)


@pytest.mark.parametrize("name", MEMORY_METHODS + ["rat", "gated_cnn"])
def test_small_layers_of_every_shape_run(name):
    for dim, heads, kv in ((32, 2, 2), (48, 3, 1), (64, 4, 2)):
        layer = ak.nn.Attention(dim, heads, kv_heads=kv, method=name, causal=True)
        y = layer(torch.randn(2, 9, dim))
        assert y.shape == (2, 9, dim) and torch.isfinite(y).all()


RSS_SCRIPT = textwrap.dedent("""
    import resource, sys, torch, attnkit as ak
    from attnkit.mechanisms.linear import _memory as M
    torch.manual_seed(0)
    torch.set_num_threads(1)
    name, L = sys.argv[1], int(sys.argv[2])
    B, H, D = 1, 2, 16
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with torch.no_grad():
        if name == "rat":
            q, k, v = (torch.randn(1, H, L, D) for _ in range(3))
            ak.attend(q, k, v, is_causal=True, method="rat", chunk_size=64, backend="chunked")
        else:
            rule = M.Rule("t", lambda e, x: 2 * e)
            init = [torch.randn(H, 64, D) / 4, torch.randn(H, D, 64) / 8]
            q = torch.nn.functional.normalize(torch.randn(B, H, 1, L, D), dim=-1)
            k = torch.nn.functional.normalize(torch.randn(B, H, L, D), dim=-1)
            g = (torch.full((B, H, L), 0.1), torch.full((B, H, L), 0.99), torch.full((B, H, L), 0.5))
            M.chunked(M.fresh_state(init, B, rule), q, k, torch.randn(B, H, L, D), g, {}, rule, 64, "token")
    print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)
""")


def _grown_mib(name, L):
    proc = subprocess.run([sys.executable, "-c", RSS_SCRIPT, name, str(L)], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr
    return float(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.parametrize("name", ["rat", "titans"])
def test_chunked_forms_grow_memory_linearly_in_length(name):
    """16k -> 64k tokens: RSS growth stays within ~linear (x4 plus slack) and far below one L x L map
    (64k^2 fp32 = 16 GiB per head)."""
    small, large = _grown_mib(name, 16384), _grown_mib(name, 65536)
    assert large < 6 * max(small, 8.0) and large < 1024, (small, large)
