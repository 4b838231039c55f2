"""Training-free dynamic-sparsity methods (moba, vmoba, kinetics, hip, h2o) and their shared
selection machinery: selections against loop-by-loop re-derivations of the official algorithms,
selection-then-oracle equality, density=1 is dense, documented budgets, gradients, decoding,
awkward shapes, option errors, the selection patterns' block plans, ``ak.select`` and the GPU
benchmark script's CPU path."""

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

import attnkit as ak
import dynamic_refs as refs
from attnkit.call import PATTERNS
from attnkit.patterns import BlockSelection, BlockWindow, EvictionTimes, PermutedPattern, plan_from_dense
from helpers import inputs, rel_err

DYNAMIC = ["h2o", "hip", "kinetics", "moba", "vmoba"]


pytestmark = pytest.mark.usefixtures("one_thread")


def claimed(name):
    return [p for p in PATTERNS if p in ak.method_info(name).patterns]


def lengths(pattern, n=23):
    return (n, n) if pattern.endswith("self") else (n - 9, n)


def small_options(name, L, **extra):
    base = {"moba": {"chunk_size": 4}, "kinetics": {"chunk_size": 3, "sink": 2, "local": 3},
            "hip": {"key_chunk": 2, "window": 3}, "h2o": {}, "vmoba": {"grid": (1, 1, L), "frames_per_chunk": 1}}
    return {**base[name], **extra}


# -- the selections follow the official algorithms -----------------------------------------------
@pytest.mark.parametrize("opts", [dict(chunk_size=4, top_k=2), dict(chunk_size=3, density=0.4),
                                  dict(chunk_size=5, top_k=1), dict(chunk_size=1, density=0.2)])
@pytest.mark.parametrize("lq,lk", [(23, 23), (9, 23), (25, 17)])
def test_moba_selection_matches_official_rule(opts, lq, lk):
    q, k, v = inputs(B=1, H=4, Hkv=2, Lq=lq, Lk=lk, D=8, seed=1)
    sel = ak.select(q, k, v, is_causal=True, enable_gqa=True, method="moba", **opts)
    assert torch.equal(sel.mask(), refs.moba(q, k, opts["chunk_size"], opts.get("top_k"), opts.get("density")))


@pytest.mark.parametrize("opts", [dict(chunk_size=3, sink=2, local=3, top_k=2), dict(chunk_size=4, sink=0, local=0,
                                  top_k=1), dict(chunk_size=2, sink=5, local=1, density=0.3),
                                  dict(chunk_size=16, sink=4, local=16, top_k=1)])
@pytest.mark.parametrize("lq,lk", [(40, 40), (1, 40), (12, 40)])
def test_kinetics_selection_matches_official_rule(opts, lq, lk):
    q, k, v = inputs(B=1, H=4, Hkv=2, Lq=lq, Lk=lk, D=8, seed=2)
    sel = ak.select(q, k, v, is_causal=True, enable_gqa=True, method="kinetics", **opts)
    want = refs.kinetics(q, k, 8 ** -0.5, opts["chunk_size"], opts["sink"], opts["local"],
                         opts.get("top_k"), opts.get("density"))
    assert torch.equal(sel.mask(), want)


def test_kinetics_chunk_score_is_mean_query_dot_mean_key():
    """(3) of the spec: the mean logit over a chunk and a kv head's query heads is linear."""
    q, k, _ = inputs(B=1, H=4, Hkv=1, Lq=1, Lk=32, D=8, seed=3)
    logits = (q[0, :, 0] @ k[0, 0].T).mean(0)[4:20].view(4, 4).mean(-1)
    means = k[0, 0, 4:20].view(4, 4, 8).mean(1)
    assert torch.allclose(logits, q[0, :, 0].mean(0) @ means.T)


@pytest.mark.parametrize("opts", [dict(budget=6, window=3), dict(density=0.3, window=0, key_chunk=3),
                                  dict(budget=4, window=5, key_chunk=1, query_stride=3),
                                  dict(budget=8, query_chunk=8, window=4), dict(density=0.5, query_chunk=5, window=2)])
@pytest.mark.parametrize("lq,lk", [(45, 45), (7, 45)])
def test_hip_tree_search_matches_official_loop(opts, lq, lk):
    q, k, v = inputs(B=1, H=2, Hkv=1, Lq=lq, Lk=lk, D=8, seed=4)
    sel = ak.select(q, k, v, is_causal=True, enable_gqa=True, method="hip", **opts)
    want = refs.hip(q, k, opts.get("budget"), opts.get("density"), opts.get("query_chunk", 1),
                    opts.get("key_chunk", 2), opts["window"], opts.get("query_stride", 2))
    assert torch.equal(sel.mask(), want)


@pytest.mark.parametrize("heavy,recent,prefill", [(3, 4, 0), (0, 5, 0), (5, 0, 3), (2, 2, 17), (1, 1, 0)])
def test_h2o_eviction_matches_official_cache(heavy, recent, prefill):
    q, k, v = inputs(B=2, H=4, Hkv=2, Lq=30, D=8, seed=5)
    sel = ak.select(q, k, v, is_causal=True, enable_gqa=True, method="h2o", heavy=heavy, recent=recent,
                    prefill=prefill)
    assert torch.equal(sel.mask(), refs.h2o(q, k, 8 ** -0.5, heavy, recent, prefill))


VMOBA_CASES = [
    dict(partition="1d", frames_per_chunk=2), dict(partition="2d", tile=(2, 3)), dict(partition="3d", cube=(2, 2, 3)),
    dict(partition="2d", tile=(2, 1), scope="head", threshold=0.5), dict(partition="3d", cube=(1, 2, 3), scope="block"),
    dict(partition="1d", frames_per_chunk=1, scope="all", threshold=0.1),
    dict(partition="3d", cube=(2, 2, 3), top_k=2), dict(partition="2d", tile=(2, 3), scope="head", density=0.3),
    dict(partition="1d", frames_per_chunk=3, scope="all", top_k=1),
]


@pytest.mark.parametrize("opts", VMOBA_CASES, ids=lambda o: "-".join(f"{k}{v}" for k, v in o.items()))
def test_vmoba_selection_matches_official_rule(opts):
    grid = (4, 4, 3)
    q, k, v = inputs(B=1, H=2, Hkv=1, Lq=48, D=8, seed=6)
    sel = ak.select(q, k, v, enable_gqa=True, method="vmoba", grid=grid, **opts)
    chunk = opts.get("frames_per_chunk") or opts.get("tile") or opts.get("cube")
    mode = "topk" if ("top_k" in opts or "density" in opts) else "threshold"
    want = refs.vmoba(q, k, grid, opts["partition"], chunk, mode, opts.get("scope", "query"),
                      opts.get("threshold", 0.25), opts.get("top_k"), opts.get("density"))
    assert torch.equal(sel.mask(), want)


def test_vmoba_partition_cycles_with_layer():
    q, k, v = inputs(B=1, H=2, Hkv=2, Lq=48, D=8, seed=7)
    sizes = [ak.select(q, k, v, method="vmoba", grid=(4, 4, 3), layer=layer).details["chunk_size"]
             for layer in range(4)]
    assert sizes == [12, 4, 1, 12]  # 1d: 1 frame x 12; 2d: 4 frames x (1, 1); 3d: (1, 1, 1); then 1d again


# -- selection, then the oracle on the selected mask ----------------------------------------------
CASES = [(m, p) for m in DYNAMIC for p in claimed(m)]


@pytest.mark.parametrize("name,pattern", CASES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_selection_then_oracle(name, pattern, dtype):
    lq, lk = lengths(pattern, 36 if name == "vmoba" else 29)
    q, k, v = inputs(B=2, H=4, Hkv=2, Lq=lq, Lk=lk, D=16, Dv=8, dtype=dtype, seed=8)
    causal = pattern.startswith("causal")
    opts = small_options(name, lq, density=0.3)
    if name == "vmoba":
        opts = {"grid": (3, 4, 3), "partition": "2d", "tile": (2, 3), "density": 0.3}
    sel = ak.select(q, k, v, is_causal=causal, enable_gqa=True, method=name, **opts)
    want = ak.reference(q, k, v, mask=sel.mask())
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    for backend in ak.method_info(name).backends:
        if backend == "flex" and not torch.cuda.is_available():
            continue
        got = ak.attend(q, k, v, is_causal=causal, enable_gqa=True, method=name, backend=backend, **opts)
        assert got.dtype == dtype and rel_err(got, want) <= tol, backend
    assert rel_err(sel.attend(q, k, v), want) <= tol
    assert 0.0 < sel.density() < 1.0


@pytest.mark.parametrize("name,pattern", CASES)
def test_density_one_is_dense(name, pattern):
    lq, lk = lengths(pattern, 24)
    q, k, v = inputs(B=1, H=4, Hkv=2, Lq=lq, Lk=lk, D=8, seed=9)
    causal = pattern.startswith("causal")
    opts = small_options(name, lq, density=1.0)
    if name == "vmoba":
        opts = {"grid": (2, 4, 3), "partition": "3d", "cube": (1, 2, 3), "density": 1.0}
    got = ak.attend(q, k, v, is_causal=causal, enable_gqa=True, method=name, **opts)
    assert rel_err(got, ak.reference(q, k, v, is_causal=causal)) <= 1e-12
    assert ak.select(q, k, v, is_causal=causal, enable_gqa=True, method=name, **opts).density() == 1.0


# -- budgets: exported selections keep what the docstrings say -----------------------------------
@pytest.mark.parametrize("density", [0.1, 0.25, 0.5])
def test_documented_budgets(density):
    ceil = lambda x: max(1, math.ceil(x - 1e-9))  # noqa: E731
    q, k, v = inputs(B=1, H=2, Hkv=1, Lq=64, D=8, seed=10)
    # moba: ceil(density * visible chunks) chunks per query, its own included
    sel = ak.select(q, k, v, is_causal=True, enable_gqa=True, method="moba", chunk_size=4, density=density)
    own = torch.arange(64) // 4
    assert torch.equal(sel.details["kept_chunks"][0, 0], torch.tensor([ceil(density * (c + 1)) for c in own]))
    # kinetics: ceil(density * M) dynamic chunks per query
    sel = ak.select(q, k, v, is_causal=True, enable_gqa=True, method="kinetics", chunk_size=4, sink=2, local=3,
                    density=density)
    tiles = sel.details["tiles"][0, 0]  # chunk 0 holds the sinks (key_shift = 2)
    for i in range(64):
        m = max(0, (i + 1 - 3 - 2) // 4)
        if m and ceil(density * m) < m:
            assert int(tiles[i, 1:1 + m].sum()) == ceil(density * m)
    # hip: ceil(density * NB) chunks per query block
    sel = ak.select(q, k, v, is_causal=True, enable_gqa=True, method="hip", key_chunk=2, window=4, density=density)
    nb = torch.tensor([math.ceil(max(0, i + 1 - 4) / 2) for i in range(64)])
    want = torch.tensor([min(n, ceil(density * n)) if n else 0 for n in nb.tolist()])
    assert torch.equal(sel.details["tiles"][0, 0].sum(-1), want)
    # vmoba top-k: ceil(density * C) chunks per query; per head ceil(density * C) * S pairs
    sel = ak.select(q, k, v, method="vmoba", grid=(4, 4, 4), partition="3d", cube=(2, 2, 2), density=density,
                    enable_gqa=True)
    assert (sel.details["tiles"].sum(-1) == ceil(density * 8)).all()
    sel = ak.select(q, k, v, method="vmoba", grid=(4, 4, 4), partition="3d", cube=(2, 2, 2), density=density,
                    scope="head", enable_gqa=True)
    assert (sel.details["tiles"].sum((-1, -2)) == ceil(density * 8) * 64).all()
    # h2o: a cache of ceil(density * L) tokens, half heavy hitters; a row sees at most that + itself
    sel = ak.select(q, k, v, is_causal=True, enable_gqa=True, method="h2o", density=density)
    size = ceil(density * 64)
    assert sel.details["heavy"] + sel.details["recent"] == size and sel.details["heavy"] == size // 2
    assert torch.equal(sel.kept()[0, 0], torch.clamp(torch.arange(1, 65), max=size + 1))


def test_budget_knobs_and_density_conflict():
    q, k, v = inputs(B=1, H=2, Hkv=2, Lq=16, D=8)
    for name, knob in [("moba", {"top_k": 2}), ("kinetics", {"top_k": 2}), ("hip", {"budget": 8}),
                       ("vmoba", {"top_k": 2, "grid": (1, 4, 4)}), ("h2o", {"heavy": 2, "recent": 2})]:
        with pytest.raises(ak.OptionError, match="density"):
            ak.attend(q, k, v, is_causal=name != "vmoba", method=name, density=0.5, **knob)


# -- gradients, dtypes and awkward shapes --------------------------------------------------------
@pytest.mark.parametrize("name", DYNAMIC)
def test_gradients_flow_through_attention_on_the_selection(name):
    pattern = claimed(name)[0]
    q, k, v = inputs(B=1, H=4, Hkv=2, Lq=24, D=8, grad=True, seed=12)
    causal = pattern.startswith("causal")
    opts = small_options(name, 24, density=0.3)
    if name == "vmoba":
        opts = {"grid": (2, 4, 3), "partition": "2d", "tile": (2, 3), "density": 0.4}
    mask = ak.select(q, k, v, is_causal=causal, enable_gqa=True, method=name, **opts).mask()
    ref = ak.reference(q, k, v, mask=mask)
    w = torch.randn_like(ref)
    want = torch.autograd.grad((ref * w).sum(), (q, k, v))
    for backend in ("blocksparse", "dense"):
        out = ak.attend(q, k, v, is_causal=causal, enable_gqa=True, method=name, backend=backend, **opts)
        got = torch.autograd.grad((out * w).sum(), (q, k, v))
        for g, r in zip(got, want):
            assert rel_err(g, r) <= 1e-9, backend


@pytest.mark.parametrize("name", ["moba", "kinetics", "hip", "h2o"])
@pytest.mark.parametrize("shape", [dict(Lq=1, Lk=1), dict(Lq=5, Lk=5), dict(Lq=1, Lk=33), dict(Lq=33, Lk=20),
                                   dict(Lq=67, Lk=67, D=48)], ids=str)
def test_awkward_shapes_causal(name, shape):
    if name == "h2o" and shape["Lq"] != shape["Lk"]:
        pytest.skip("h2o is causal self-attention")
    q, k, v = inputs(B=2, H=3, Hkv=1, **shape, seed=13)
    opts = {"moba": {"chunk_size": 7, "top_k": 3}, "kinetics": {"chunk_size": 5, "top_k": 2, "sink": 1, "local": 2},
            "hip": {"budget": 5, "key_chunk": 3, "window": 4, "query_chunk": 4}, "h2o": {"heavy": 2, "recent": 3}}[name]
    got = ak.attend(q, k, v, is_causal=True, enable_gqa=True, method=name, **opts)
    mask = ak.select(q, k, v, is_causal=True, enable_gqa=True, method=name, **opts).mask()
    assert torch.isfinite(got).all()
    assert rel_err(got, ak.reference(q, k, v, mask=mask)) <= 1e-10


@pytest.mark.parametrize("grid", [(1, 1, 1), (1, 1, 7), (3, 1, 5), (2, 6, 4)])
def test_vmoba_awkward_grids(grid):
    L = math.prod(grid)
    q, k, v = inputs(B=2, H=2, Hkv=1, Lq=L, D=8, seed=14)
    for part in ("1d", "2d", "3d"):
        got = ak.attend(q, k, v, enable_gqa=True, method="vmoba", grid=grid, partition=part)
        mask = ak.select(q, k, v, enable_gqa=True, method="vmoba", grid=grid, partition=part).mask()
        assert rel_err(got, ak.reference(q, k, v, mask=mask)) <= 1e-10


def test_bfloat16_selection_runs():
    q, k, v = inputs(B=1, H=4, Hkv=2, Lq=64, D=16, dtype=torch.bfloat16)
    for name in DYNAMIC:
        opts = small_options(name, 64, density=0.3) if name != "vmoba" else {"grid": (4, 4, 4), "density": 0.3}
        out = ak.attend(q, k, v, is_causal=name != "vmoba", enable_gqa=True, method=name, **opts)
        assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


# -- causality and decoding ------------------------------------------------------------------------
def test_hip_query_chunks_look_ahead_only_within_their_block():
    q, k, v = inputs(B=1, H=2, Hkv=2, Lq=48, D=8, seed=15)
    opts = dict(query_chunk=8, key_chunk=1, budget=3, window=2)
    base = ak.attend(q, k, v, is_causal=True, method="hip", **opts)
    changed = False
    for t in (5, 21, 37):  # change queries after t: rows before t's block never move
        q2 = q.clone()
        q2[:, :, t + 1:] = torch.randn_like(q2[:, :, t + 1:]) * 3
        out = ak.attend(q2, k, v, is_causal=True, method="hip", **opts)
        start = t // 8 * 8
        assert torch.equal(out[:, :, :start], base[:, :, :start])
        changed |= not torch.equal(out[:, :, start:t + 1], base[:, :, start:t + 1])
    assert changed  # the documented look-ahead inside a block is real
    base1 = ak.attend(q, k, v, is_causal=True, method="hip", **{**opts, "query_chunk": 1})
    q2 = q.clone()
    q2[:, :, 30:] = 0
    assert torch.equal(ak.attend(q2, k, v, is_causal=True, method="hip", **{**opts, "query_chunk": 1})[:, :, :30],
                       base1[:, :, :30])


@pytest.mark.parametrize("name,opts", [("kinetics", {"chunk_size": 3, "top_k": 2, "sink": 1, "local": 2}),
                                       ("hip", {"budget": 4, "window": 3}), ("moba", {"chunk_size": 3, "top_k": 2}),
                                       ("h2o", {"heavy": 3, "recent": 2, "prefill": 6})])
def test_decode_token_by_token_equals_forward(name, opts):
    torch.manual_seed(0)
    layer = ak.nn.Attention(32, 4, kv_heads=2, method=name, causal=True, rope=True, **opts).double()
    x = torch.randn(2, 23, 32, dtype=torch.float64)
    full = layer(x)
    cache = layer.init_cache(2)
    steps = [layer(x[:, :4], cache=cache), layer(x[:, 4:9], cache=cache)]
    steps += [layer(x[:, t:t + 1], cache=cache) for t in range(9, 23)]
    assert rel_err(torch.cat(steps, 1), full) < 1e-10


def test_h2o_forward_mask_equals_sequential_eviction_decoding():
    """The H2O forward (exact attention on its causal eviction mask) equals running the eviction
    cache token by token, and the cache never holds more than heavy + recent entries."""
    from attnkit.mechanisms.sparse.h2o import H2OState, advance

    q, k, v = inputs(B=2, H=4, Hkv=2, Lq=40, D=8, seed=16)
    forward = ak.attend(q, k, v, is_causal=True, enable_gqa=True, method="h2o", heavy=4, recent=3)
    state, outs = H2OState(), []
    for t in range(40):
        outs.append(advance(state, q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], 8 ** -0.5, 4, 3, 0))
        assert state.size <= 7
        assert set(range(max(0, t - 2), t + 1)) <= set(state.positions()[0, 0].tolist())  # the recent ones stay
    assert rel_err(torch.cat(outs, 2), forward) < 1e-12


def test_h2o_decoding_needs_token_budgets():
    layer = ak.nn.Attention(16, 2, method="h2o", causal=True, density=0.2)
    layer(torch.randn(1, 9, 16))  # a forward knows its length
    with pytest.raises(ak.OptionError, match="heavy"):
        layer(torch.randn(1, 1, 16), cache=layer.init_cache(1))
    with pytest.raises(ak.OptionError, match="both"):
        ak.attend(*inputs(Lq=8, Hkv=4), is_causal=True, method="h2o", heavy=3)


# -- option errors ---------------------------------------------------------------------------------
def test_vmoba_option_errors():
    q, k, v = inputs(B=1, H=2, Hkv=2, Lq=24, D=8)
    with pytest.raises(ak.OptionError, match="grid"):
        ak.attend(q, k, v, method="vmoba")
    with pytest.raises(ak.OptionError, match="product"):
        ak.attend(q, k, v, method="vmoba", grid=(2, 3, 5))
    with pytest.raises(ak.OptionError, match="divide"):
        ak.attend(q, k, v, method="vmoba", grid=(2, 3, 4), partition="2d", tile=(2, 3))
    with pytest.raises(ak.OptionError, match="threshold"):
        ak.attend(q, k, v, method="vmoba", grid=(2, 3, 4), select_mode="threshold", top_k=2)
    with pytest.raises(ak.OptionError, match="block"):
        ak.attend(q, k, v, method="vmoba", grid=(2, 3, 4), top_k=2, scope="block")
    with pytest.raises(ak.UnsupportedPatternError):
        ak.attend(q, k, v, is_causal=True, method="vmoba", grid=(2, 3, 4))


# -- the selection patterns ------------------------------------------------------------------------
@pytest.mark.parametrize("bq,bk,shift", [(1, 3, 0), (4, 4, 0), (3, 5, 2), (8, 1, 0), (1, 16, 12), (2, 7, 6)])
@pytest.mark.parametrize("tile", [(4, 4), (8, 16), (5, 3)])
def test_block_selection_plan_is_exact_at_any_tile_size(bq, bk, shift, tile):
    lq, lk = 29, 37
    g = torch.Generator().manual_seed(bq * 100 + bk)
    tiles = torch.rand(2, 3, math.ceil(lq / bq), math.ceil((lk + shift) / bk), generator=g) < 0.3
    p = BlockSelection(tiles, bq, bk, key_shift=shift)
    assert torch.equal(p.block_plan(lq, lk, tile).states, plan_from_dense(p.to_dense(lq, lk), *tile).states)


@pytest.mark.parametrize("tile", [(4, 4), (8, 16), (5, 3)])
def test_eviction_and_window_plans(tile):
    lq = lk = 33
    until = torch.randint(0, 40, (1, 2, lk))
    until = torch.maximum(until, torch.arange(lk))  # a key lives at least until its own row
    for p in (EvictionTimes(until), BlockWindow(5, 4), BlockWindow(0, 1)):
        plan = p.block_plan(lq, lk, tile).states
        exact = plan_from_dense(p.to_dense(lq, lk), *tile).states
        assert torch.all((plan > 0) >= (exact > 0)) and torch.all((plan == 2) == (exact == 2))
    i, j = torch.arange(lq)[:, None], torch.arange(lk)
    assert torch.equal(BlockWindow(5, 4).to_dense(lq, lk), (j <= i) & (j > (i // 4 * 4 + 3).clamp(max=32) - 5))


def test_permuted_pattern_is_seen_in_call_order():
    inner = BlockSelection(torch.tensor([[True, False], [False, True]]), 3, 3)
    order = torch.tensor([[3, 0, 5, 1, 4, 2]])
    mask = PermutedPattern(inner, order, order).to_dense(6, 6)
    want = inner.to_dense(6, 6)[torch.argsort(order[0])][:, torch.argsort(order[0])]
    assert torch.equal(mask, want)


# -- ak.select ---------------------------------------------------------------------------------------
def test_select_api():
    q, k, v = inputs(B=1, H=2, Hkv=1, Lq=40, D=8, seed=17)
    sel = ak.select(q, k, is_causal=True, enable_gqa=True, method="moba", chunk_size=4, top_k=2)
    assert isinstance(sel, ak.Selection) and sel.mask().shape == (1, 2, 40, 40)
    assert sel.kept().shape == (1, 2, 40) and 0 < sel.tile_density(8) <= 1
    r = sel.recall(q, k)
    assert r.shape == (1, 2) and bool(((r > 0) & (r < 1)).all())
    dense = ak.select(q, k, is_causal=True, enable_gqa=True, method="moba", chunk_size=4, density=1.0)
    assert torch.allclose(dense.recall(q, k), torch.ones(1, 2, dtype=torch.float64))
    assert torch.allclose(sel.recall(q, k, rows=torch.arange(0, 40, 3)), sel.recall(q, k), atol=0.2)
    why = ak.explain(q, k, v, is_causal=True, enable_gqa=True, method="moba", chunk_size=4, top_k=2)
    assert isinstance(why.plan, ak.Selection)
    with pytest.raises(ak.ArgumentError, match="selection"):
        ak.select(q, k, method="sliding_window", window=3)
    with pytest.raises(ak.ShapeError, match="made for"):
        sel.attend(q[:, :, :20], k, v)
    # vmoba's selection runs in its own token order but is exported in the call's order
    q, k, v = inputs(B=1, H=2, Hkv=1, Lq=48, D=8, seed=18)
    sel = ak.select(q, k, v, enable_gqa=True, method="vmoba", grid=(4, 4, 3), partition="2d", tile=(2, 3), top_k=2)
    assert sel.order is not None and rel_err(sel.attend(q, k, v), ak.reference(q, k, v, mask=sel.mask())) < 1e-12


# -- the GPU benchmark script, at tiny sizes on the CPU -----------------------------------------------
def test_bench_dynamic_script_runs_on_cpu(tmp_path):
    path = Path(__file__).resolve().parents[1] / "scripts" / "gpu" / "bench_dynamic.py"
    spec = importlib.util.spec_from_file_location("bench_dynamic", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.main(["--out", str(tmp_path), "--length", "128", "--heads", "2", "--dim", "16", "--reps", "1",
                "--densities", "0.25", "--device", "cpu", "--recall-rows", "16"])
    data = json.loads((tmp_path / "bench_dynamic.json").read_text())
    rows = data["rows"]
    assert {r["method"] for r in rows} >= set(DYNAMIC) | {"dense"}
    for r in rows:
        if r["method"] != "dense":
            assert r["selection_ms"] > 0 and r["attention_ms"] > 0 and 0 < r["density"] <= 1
            two_level = r["method"] in ("hcam", "landmark")  # their own gather form (test_dynamic_trainable.py)
            assert 0 <= r["recall"] <= 1 + 1e-9 and r["backend"] == ("gather" if two_level else "blocksparse")
            if r["method"] in ("moba", "vmoba", "kinetics"):  # per-query selections: the varlen engine too
                assert r["varlen_ms"] > 0
    assert "selection" in (tmp_path / "bench_dynamic.md").read_text()
