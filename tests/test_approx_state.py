"""States across calls (Re-ttention's denoising steps, DeltaLLM's decoding) and the routing layer
(centroids as buffers, EMA update, commitment loss, decoding)."""

import pytest
import torch

import attnkit as ak
from attnkit.mechanisms.approx._common import layer_norm
from attnkit.mechanisms.approx.deltallm import DeltaState
from attnkit.mechanisms.approx.rettention import RettentionState, step_kind
from helpers import inputs, rel_err


def drifting(steps, L=40, drift=0.05, seed=0):
    """Inputs of consecutive 'denoising steps': each a small move from the previous one."""
    q, k, v = inputs(B=2, H=2, Hkv=1, Lq=L, D=8, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    out = []
    for _ in range(steps):
        out.append((q, k, v))
        q, k, v = (t + drift * torch.randn(t.shape, generator=g, dtype=t.dtype) for t in (q, k, v))
    return out


# -- Re-ttention ---------------------------------------------------------------------------------
def test_rettention_schedule_is_the_official_one():
    kinds = [step_kind(s, 5, 5) for s in range(20)]  # PixArt: full 0-4, refresh 5, 10, 15
    assert kinds[:5] == ["full"] * 5 and [s for s, k in enumerate(kinds) if k == "refresh"] == [5, 10, 15]
    kinds = [step_kind(s, 15, 5) for s in range(50)]  # CogVideoX: full < 15, refresh when step % 5 == 0
    assert [s for s, k in enumerate(kinds) if k == "refresh"] == [15, 20, 25, 30, 35, 40, 45]


def test_rettention_unchanged_inputs_give_exact_attention_at_every_step():
    q, k, v = inputs(B=2, H=2, Hkv=1, Lq=40, D=8, seed=2)
    state = RettentionState()
    want = ak.reference(q, k, v)
    for step in range(8):
        out = ak.attend(q, k, v, enable_gqa=True, method="rettention", window_share=0.2, state=state, warmup=2,
                        refresh_every=3, rho_increment=0.0)
        assert rel_err(out, want) < 1e-12, (step, state.last)
    assert state.step == 8 and state.last == "sparse"
    # the cached ratio is the share of the softmax mass inside the window
    i = torch.arange(40)
    inside = ((i[:, None] - i[None, :]).abs() <= 4)
    p = torch.softmax(q @ k.repeat_interleave(2, 1).transpose(-1, -2) * 8 ** -0.5, -1)
    assert torch.allclose(state.rho, (p * inside).sum(-1, keepdim=True), atol=1e-12)


@pytest.mark.parametrize("backend", ["blocksparse", "dense"])
def test_rettention_steps_match_the_reference(backend):
    from attnkit.mechanisms.approx.rettention import reference
    from test_approx import _call

    fast, ref = RettentionState(), RettentionState()
    opts = dict(window_share=0.3, warmup=2, refresh_every=3)
    for q, k, v in drifting(8):
        got = ak.attend(q, k, v, enable_gqa=True, method="rettention", backend=backend, state=fast, **opts)
        want = reference(_call("rettention", q, k, v, False, state=ref, **opts))
        assert rel_err(got, want) < 1e-12
    assert fast.step == ref.step == 8 and torch.allclose(fast.rho, ref.rho, atol=1e-12)
    assert torch.allclose(fast.rho, ref.rho) and abs(float(fast.rho.mean() - ref.rho.mean())) < 1e-12


def test_rettention_reshaping_beats_plain_window_attention_and_improves_with_the_window():
    """Over drifting steps, the sparse steps' error against exact attention falls as the window
    grows, and the reshaped steps are closer than the plain window attention."""
    steps = drifting(8, drift=0.02)
    errors = []
    for share in (0.1, 0.3, 0.6):
        state, err, plain = RettentionState(), 0.0, 0.0
        for q, k, v in steps:
            out = ak.attend(q, k, v, enable_gqa=True, method="rettention", window_share=share, state=state,
                            warmup=1, refresh_every=4, rho_increment=0.0)
            if state.last == "sparse":
                want = ak.reference(q, k, v)
                err += float((out - want).norm() / want.norm())
                window = ak.attend(q, k, v, enable_gqa=True, method="rettention", window_share=share)
                plain += float((window - want).norm() / want.norm())
        assert err < 0.5 * plain
        errors.append(err)
    assert errors[0] > errors[1] > errors[2]


def test_rettention_state_errors():
    q, k, v = inputs(B=2, H=2, Hkv=1, Lq=40, D=8)
    state = RettentionState()
    ak.attend(q, k, v, enable_gqa=True, method="rettention", state=state)
    with pytest.raises(ak.OptionError, match=r"statistics for \(2, 2, 40\).*\(2, 2, 30\)"):
        ak.attend(q[:, :, :30], k[:, :, :30], v[:, :, :30], enable_gqa=True, method="rettention", state=state)
    with pytest.raises(ak.OptionError, match="state must be a RettentionState"):
        ak.attend(q, k, v, enable_gqa=True, method="rettention", state=DeltaState())


# -- DeltaLLM ------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["query", "score"])
@pytest.mark.parametrize("backend", ["chunked", "recurrent"])
def test_deltallm_state_carries_the_recurrence_across_calls(variant, backend):
    q, k, v = inputs(B=2, H=2, Hkv=1, Lq=24, D=8, seed=5)
    opts = dict(window=3, threshold=0.6, variant=variant, enable_gqa=True, is_causal=True, method="deltallm",
                backend=backend)
    full_state = DeltaState()
    full = ak.attend(q, k, v, state=full_state, **opts)
    state = DeltaState()
    parts = [ak.attend(q[:, :, :10], k[:, :, :10], v[:, :, :10], state=state, **opts)]
    for t in range(10, 24, 5):  # chunks of new queries over the whole history
        parts.append(ak.attend(q[:, :, t:t + 5], k[:, :, :t + 5], v[:, :, :t + 5], state=state, **opts))
    assert rel_err(torch.cat(parts, 2), full) < 1e-12
    assert state.position == full_state.position == 24
    assert state.entries == full_state.entries and state.zeros == full_state.zeros > 0
    with pytest.raises(ak.OptionError, match="left at position 24 but this call's first query sits at"):
        ak.attend(q[:, :, :3], k[:, :, :20], v[:, :, :20], state=state, **opts)
    other = {**opts, "variant": "score" if variant == "query" else "query"}
    with pytest.raises(ak.OptionError, match=f"holds a '{variant}'-variant recurrence"):
        ak.attend(q[:, :, :1], k[:, :, :25], v[:, :, :25], state=state, **other)


@pytest.mark.parametrize("variant", ["query", "score"])
def test_deltallm_sparsity_grows_with_the_threshold(variant):
    q, k, v = inputs(B=1, H=2, Hkv=2, Lq=40, D=8, seed=1)
    sparsity = []
    for theta in (0.0, 0.2, 0.5, 1.0, 3.0):
        st = DeltaState()
        ak.attend(q, k, v, is_causal=True, method="deltallm", window=4, threshold=theta, variant=variant, state=st)
        sparsity.append(st.sparsity)
    assert sparsity[0] == 0.0 and all(a < b for a, b in zip(sparsity, sparsity[1:])), sparsity


# -- the routing layer ---------------------------------------------------------------------------------
def test_routing_layer_trains_and_updates_its_centroids():
    torch.manual_seed(0)
    layer = ak.nn.Attention(32, 4, method="routing", causal=True, clusters=3, window=6)
    x = torch.randn(2, 20, 32)
    before = layer.inner.centroids.clone()
    y = layer(x)
    loss = y.pow(2).mean() + layer.inner.aux_loss
    loss.backward()
    assert layer.inner.q_proj.weight.grad is not None and torch.isfinite(loss)
    assert float(layer.inner.aux_loss.detach()) > 0 and not torch.equal(before, layer.inner.centroids)
    layer.eval()
    frozen = layer.inner.centroids.clone()
    layer(x)
    assert torch.equal(frozen, layer.inner.centroids)


def test_routing_ema_with_no_decay_gives_the_mean_of_assigned_items():
    torch.manual_seed(1)
    layer = ak.nn.Attention(16, 2, method="routing", causal=True, clusters=3, window=4, ema_decay=0.0).double()
    x = torch.randn(2, 30, 16, dtype=torch.float64)
    inner = layer.inner
    q = inner.q_proj(x).view(2, 30, 2, 8).transpose(1, 2)
    for _ in range(3):  # the same batch: assignments settle, centroids are their means
        start = inner.centroids.clone()
        layer(x)
    xn = layer_norm(q.detach())
    assign = (xn @ start.transpose(-1, -2)).argmax(-1)
    for h in range(2):
        for c in range(3):
            mine = assign[:, h] == c
            if mine.any():
                assert torch.allclose(inner.centroids[h, c], xn[:, h][mine].mean(0), atol=1e-4)


@pytest.mark.parametrize("cfg", [dict(share_qk=False), dict(share_qk=True, rope=True), dict(normalize=False)])
def test_routing_layer_decodes_like_its_forward(cfg):
    torch.manual_seed(2)
    layer = ak.nn.Attention(32, 4, method="routing", causal=True, clusters=3, window=5, block_size=4, **cfg).double()
    layer.eval()
    x = torch.randn(2, 17, 32, dtype=torch.float64)
    full = layer(x)
    cache = layer.init_cache(2)
    steps = [layer(x[:, :6], cache=cache)] + [layer(x[:, t:t + 1], cache=cache) for t in range(6, 17)]
    assert rel_err(torch.cat(steps, 1), full) < 1e-12


def test_routing_layer_cross_and_bidirectional():
    torch.manual_seed(3)
    cross = ak.nn.Attention(16, 2, method="routing", cross=True, context_dim=24, clusters=2, window=4)
    y = cross(torch.randn(2, 7, 16), context=torch.randn(2, 11, 24))
    assert y.shape == (2, 7, 16) and torch.isfinite(y).all()
    with pytest.raises(ak.ArgumentError, match="cannot decode one query at a time"):
        cross.init_cache(2)
    enc = ak.nn.Attention(16, 2, method="routing", clusters=2)
    assert torch.isfinite(enc(torch.randn(1, 9, 16))).all() and enc.inner.share_qk is False
    with pytest.raises(ak.OptionError, match="kmeans_iters applies to functional calls"):
        ak.nn.Attention(16, 2, method="routing", kmeans_iters=2)
    with pytest.raises(ak.OptionError, match="share_qk=True needs self-attention with kv_heads == heads"):
        ak.nn.Attention(16, 4, kv_heads=2, method="routing", causal=True, share_qk=True)


@pytest.mark.slow
def test_rettention_runs_on_flex():
    """The window (1-D and frame) and full patterns on the flex engine (compiles on first use)."""
    q, k, v = inputs(B=1, H=2, Hkv=2, Lq=64, D=16, dtype=torch.float32, seed=4)
    with torch.no_grad():
        for opts in (dict(window_share=0.25), dict(window_share=0.5, frames=4, text_tokens=8)):
            want = ak.attend(q, k, v, method="rettention", backend="blocksparse", **opts)
            got = ak.attend(q, k, v, method="rettention", backend="flex", **opts)
            assert rel_err(got, want) < 1e-5
        a, b = RettentionState(), RettentionState()
        for q2, k2, v2 in drifting(4, L=64):
            q2, k2, v2 = (t[:1].float() for t in (q2, k2, v2))
            want = ak.attend(q2, k2, v2, enable_gqa=True, method="rettention", backend="blocksparse", state=a,
                             warmup=1, refresh_every=2)
            got = ak.attend(q2, k2, v2, enable_gqa=True, method="rettention", backend="flex", state=b,
                            warmup=1, refresh_every=2)
            assert rel_err(got, want) < 1e-5


def test_gpu_benchmark_script_runs_on_cpu(tmp_path):
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "gpu" / "bench_approx.py"
    spec = importlib.util.spec_from_file_location("bench_approx", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main(["--out", str(tmp_path), "--device", "cpu", "--lengths", "64", "--heads", "2", "--dim", "8",
                        "--reps", "1", "--dtype", "float32", "--densities", "0.25"]) == 0
    rows = json.loads((tmp_path / "bench_approx.json").read_text())["rows"]
    names = {r["method"] for r in rows}
    assert {"routing", "hyper", "combiner", "rettention", "deltallm", "dense (SDPA)"} <= names
    assert not [r for r in rows if "error" in r] and "| deltallm |" in (tmp_path / "bench_approx.md").read_text()
