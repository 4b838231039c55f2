"""1D exact patterns (s2, shifted_groups, sink_groups, sinks, prefix_lm, document, relative).

- every method equals the float64 oracle with its own dense mask (and bias), outputs and gradients
  (embeddings included), on the dense and blocksparse engines, over random configurations drawn
  wider than ``sample_options`` (hypothesis: ~10 examples by default, 50 under ``-m slow``);
- analytic block plans equal the plans of the dense masks, and stay analytic at large L;
- decoding through ``ak.nn.Attention`` reproduces the prefill rows; sinks at L = 16384 on CPU stay lean;
- errors name the option, the value and the fix.
"""

import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import attnkit as ak
from attnkit.api import _dispatch
from attnkit.call import PATTERNS
from attnkit.patterns import plan_from_dense
from helpers import grad_err, inputs, rel_err

NAMES = ["s2", "shifted_groups", "sink_groups", "sinks", "prefix_lm", "document", "relative"]
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


def claimed(name):
    return [p for p in PATTERNS if p in ak.method_info(name).patterns]


# -- random configurations, wider than sample_options -------------------------------------------
def draw_options(name, data, *, Lq, Lk, B, H, Hkv, D, causal):
    ints = lambda lo, hi: data.draw(st.integers(lo, hi))  # noqa: E731
    block = {"block_size": data.draw(st.sampled_from([16, 32]))}
    if name == "s2":
        homo = data.draw(st.booleans())
        return {**block, "sparse_block_size": ints(1, 9), "vert_stride": ints(1, 6), "homo_head": homo,
                "local_blocks": data.draw(st.one_of(st.integers(1, 4), st.tuples(st.integers(1, 3),
                                                                                     st.integers(1, 3)))),
                "num_dense_heads": 0 if homo else ints(0, Hkv), "head_sliding_offset": ints(0, 6),
                "head_sliding_step": data.draw(st.one_of(st.none(), st.integers(1, 4))),
                "vert_position_type": data.draw(st.sampled_from([None, "absolute", "relative"]))}
    if name in ("shifted_groups", "sink_groups"):
        opts = dict(block)
        if Lq == Lk and data.draw(st.booleans()):
            opts["group_size_ratio"] = data.draw(st.floats(0.05, 1.0))
        else:
            opts["group_size"] = ints(1, Lk + 3)
        if name == "sink_groups":
            opts["sinks"] = ints(0, 6)
        elif not causal and Lq == Lk:
            evens = [g for g in range(2, Lk + 1, 2) if Lk % g == 0]
            if evens and data.draw(st.booleans()):
                opts = {**block, "group_size": data.draw(st.sampled_from(evens)), "variant": "roll"}
        return opts
    if name == "sinks":
        return {**block, "sinks": ints(0, 6), "window": ints(1, Lk + 3)}
    if name == "prefix_lm":
        per_batch = data.draw(st.booleans())
        prefix = torch.tensor([ints(0, Lk + 2) for _ in range(B)]) if per_batch else ints(0, Lk + 2)
        return {**block, "prefix": prefix}
    if name == "document":
        return {**block, **draw_documents(data, Lq, Lk, B)}
    if name == "relative":
        sides = data.draw(st.sampled_from([None, "left", "both"]))
        rows = ints(1, Lk + 4)
        if sides == "both" or (sides is None and not causal):
            rows = 2 * (rows // 2) + 1
        shape = data.draw(st.sampled_from([(rows, D), (H, rows, D), (1, rows, D)]))
        g = torch.Generator().manual_seed(ints(0, 9999))
        opts = {**block, "sides": sides, "embeddings": torch.randn(shape, generator=g, dtype=torch.float64)}
        if data.draw(st.booleans()):
            opts["window"] = ints(1, Lk + 3)
        return opts
    raise KeyError(name)


def draw_documents(data, Lq, Lk, B):
    rows = data.draw(st.sampled_from([1, B]))
    if Lq > Lk or (Lq != Lk and data.draw(st.booleans())):
        q_ids = torch.randint(0, 3, (rows, Lq)) if rows > 1 else torch.randint(0, 3, (Lq,))
        k_rows = data.draw(st.sampled_from([1, rows]))
        return {"q_document_ids": q_ids, "k_document_ids": torch.randint(0, 3, (k_rows, Lk))}
    N = Lk + data.draw(st.integers(0, 4))
    how = data.draw(st.sampled_from(["runs", "random", "lengths", "lengths_tensor"]))
    if how == "random":
        return {"document_ids": torch.randint(0, 3, (rows, N))}
    per_row = []
    for _ in range(rows):
        lengths = []
        while sum(lengths) < N:
            lengths.append(data.draw(st.integers(0 if how == "lengths_tensor" else 1, 15)))
        per_row.append(lengths)
    if how == "lengths":
        return {"lengths": per_row[0]}
    if how == "lengths_tensor":
        n = max(len(r) for r in per_row)
        return {"lengths": torch.tensor([r + [0] * (n - len(r)) for r in per_row])}
    ids = [torch.repeat_interleave(torch.randperm(len(r)), torch.tensor(r)) for r in per_row]
    return {"document_ids": torch.stack([i[:N] for i in ids]) if rows > 1 else ids[0]}


# -- exactness: engines vs the oracle with the method's own mask --------------------------------
def check_exact(name, opts, *, q, k, v, causal):
    """Outputs and gradients (q, k, v and, for `relative`, the embeddings) of both mask engines
    against the float64 oracle with the method's dense mask and bias."""
    dtype = q.dtype
    leaves64 = [t.detach().to(torch.float64).requires_grad_() for t in (q, k, v)]
    opts64 = dict(opts)
    emb = opts.get("embeddings")
    if emb is not None:
        opts64["embeddings"] = emb.detach().to(torch.float64).requires_grad_()
        leaves64.append(opts64["embeddings"])
    impl, call, _, _ = _dispatch(*leaves64[:3], None, 0.0, causal, None, q.shape[1] != k.shape[1], name,
                                 "auto", None, opts64)
    mask, bias = impl.oracle_inputs(call)
    want = ak.reference(*leaves64[:3], mask=mask, bias=bias, scale=call.scale)
    w = torch.randn_like(want)
    want_grads = torch.autograd.grad((want * w).sum(), leaves64, allow_unused=True)
    for backend in ("dense", "blocksparse"):
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        run_opts = dict(opts)
        if emb is not None:
            run_opts["embeddings"] = emb.detach().to(dtype).requires_grad_()
            leaves.append(run_opts["embeddings"])
        out = ak.attend(*leaves[:3], is_causal=causal, enable_gqa=True, method=name, backend=backend, **run_opts)
        assert out.dtype == dtype and not torch.isnan(out).any()
        assert rel_err(out, want) <= TOL[dtype], (backend, "out", rel_err(out, want))
        grads = torch.autograd.grad((out * w.to(dtype)).sum(), leaves, allow_unused=True)
        for g, r, what in zip(grads, want_grads, ["q", "k", "v", "embeddings"]):
            if r is None:
                assert g is None or float(g.abs().max()) == 0
                continue
            assert grad_err(g, r) <= TOL[dtype], (backend, what, grad_err(g, r))


def exact_case(name, data):
    pattern = data.draw(st.sampled_from(claimed(name)))
    causal = pattern.startswith("causal")
    Lq = data.draw(st.integers(1, 36))
    Lk = Lq if pattern.endswith("self") else data.draw(st.integers(1, 36).filter(lambda x: x != Lq))
    Hkv = data.draw(st.sampled_from([1, 2]))
    H = Hkv * data.draw(st.sampled_from([1, 2]))
    B, D = data.draw(st.integers(1, 2)), data.draw(st.sampled_from([4, 8]))
    dtype = data.draw(st.sampled_from([torch.float64, torch.float32]))
    opts = draw_options(name, data, Lq=Lq, Lk=Lk, B=B, H=H, Hkv=Hkv, D=D, causal=causal)
    q, k, v = inputs(B=B, H=H, Hkv=Hkv, Lq=Lq, Lk=Lk, D=D, Dv=5, dtype=dtype, seed=data.draw(st.integers(0, 999)))
    check_exact(name, opts, q=q, k=k, v=v, causal=causal)


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=10)
@given(data=st.data())
def test_engines_equal_oracle(name, data):
    exact_case(name, data)


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=50)
@given(data=st.data())
def test_engines_equal_oracle_sweep(name, data):
    exact_case(name, data)


# -- block plans -----------------------------------------------------------------------------
def draw_pattern(name, data, Lq, Lk):
    H = data.draw(st.sampled_from([1, 2, 3, 4]))
    causal = data.draw(st.booleans())
    if name == "s2":
        Hkv = data.draw(st.sampled_from([d for d in range(1, H + 1) if H % d == 0]))
        opts = draw_options("s2", data, Lq=Lq, Lk=Lk, B=1, H=H, Hkv=Hkv, D=4, causal=causal)
        opts.pop("block_size")
        return ak.patterns.s2(H, kv_heads=Hkv, causal=causal, **opts)
    if name == "shifted_groups":
        if Lq == Lk and data.draw(st.booleans()):
            G = 2 * data.draw(st.integers(1, 8))
            if Lk % G == 0:
                return ak.patterns.shifted_groups(G, heads=H, variant="roll", causal=causal)
        return ak.patterns.shifted_groups(data.draw(st.integers(1, 20)), heads=H, causal=causal)
    if name == "sink_groups":
        return ak.patterns.sink_groups(data.draw(st.integers(1, 20)), heads=H, sinks=data.draw(st.integers(0, 6)),
                                       causal=causal)
    if name == "sinks":
        return ak.patterns.sinks(data.draw(st.integers(0, 8)), data.draw(st.integers(1, 30)))
    if name == "prefix_lm":
        per_batch = data.draw(st.booleans())
        return ak.patterns.prefix_lm(torch.randint(0, Lk + 3, (3,)) if per_batch else data.draw(st.integers(0, Lk + 3)))
    if name == "document":
        opts = draw_documents(data, Lq, Lk, B=2)
        return ak.patterns.document(opts.pop("document_ids", None), causal=causal, **opts)
    raise KeyError(name)


PATTERN_NAMES = [n for n in NAMES if n != "relative"]


@pytest.mark.parametrize("name", PATTERN_NAMES)
@settings(max_examples=40)
@given(data=st.data())
def test_analytic_plans_equal_dense_plans(name, data):
    Lq = data.draw(st.integers(1, 70))
    Lk = data.draw(st.integers(1, 70)) if data.draw(st.booleans()) else Lq
    if name == "document" and Lq > Lk and data.draw(st.booleans()):
        Lq, Lk = Lk, Lq
    p = draw_pattern(name, data, Lq, Lk)
    bq, bk = data.draw(st.sampled_from([1, 3, 8, 16])), data.draw(st.sampled_from([1, 5, 8, 16]))
    assert p._plan(Lq, Lk, bq, bk, None) is not None, "no analytic plan"
    analytic = p.block_plan(Lq, Lk, (bq, bk)).states
    dense = plan_from_dense(p.dense(Lq, Lk), bq, bk).states
    assert torch.equal(analytic.expand_as(dense), dense), p


@pytest.mark.parametrize("pattern", [
    ak.patterns.s2(8, kv_heads=4, sparse_block_size=64, local_blocks=4, vert_stride=8),
    ak.patterns.s2(8, sparse_block_size=128, local_blocks=(3, 2), vert_stride=4, causal=False),
    ak.patterns.shifted_groups(2048, heads=4), ak.patterns.sink_groups(1000, heads=4, sinks=4),
    ak.patterns.sinks(4, 500), ak.patterns.prefix_lm(3000),
    ak.patterns.document(lengths=[30000, 50000, 51072], causal=True)], ids=str)
def test_plans_stay_analytic_at_large_length(pattern):
    L = 1 << 17  # a dense L x L evaluation would be 2^34 rule calls
    plan = pattern.block_plan(L, L, 128)
    assert plan.states.shape[-2:] == (1024, 1024)
    assert 0 < plan.tile_density() < 1


def test_density_matches_dense_mask():
    for p in (ak.patterns.s2(4, sparse_block_size=3, local_blocks=2, vert_stride=3),
              ak.patterns.sinks(3, 7), ak.patterns.document(lengths=[5, 9, 30], causal=True)):
        want = float(p.dense(44, 44).float().mean())
        assert p.density(44, 44, block=16) == pytest.approx(want)


# -- decoding ----------------------------------------------------------------------------------
DECODE = [("sinks", {"sinks": 2, "window": 5}), ("sinks", {"sinks": 0, "window": 3}),
          ("s2", {"sparse_block_size": 3, "local_blocks": 2, "vert_stride": 3}),
          ("shifted_groups", {"group_size": 6}), ("sink_groups", {"group_size": 5, "sinks": 3}),
          ("document", {"lengths": [4, 9, 3, 20]}), ("relative", {"window": 7})]
DECODE = [(name, {**opts, "block_size": 16}) for name, opts in DECODE]


def _decode_id(x):
    return x if isinstance(x, str) else "-".join(map(str, list(x.values())[:-1]))


@pytest.mark.parametrize("name,opts", DECODE, ids=_decode_id)
def test_decode_reproduces_prefill_rows(name, opts):
    torch.manual_seed(0)
    if name == "relative":
        opts = {**opts, "embeddings": torch.randn(4, 9, 8, dtype=torch.float64)}
    layer = ak.nn.Attention(32, 4, kv_heads=2, method=name, causal=True, rope=True, **opts).double()
    x = torch.randn(2, 30, 32, dtype=torch.float64)
    full = layer(x)
    cache = layer.init_cache(2)
    steps = [layer(x[:, :1], cache=cache)] + [layer(x[:, t:t + 1], cache=cache) for t in range(1, 14)]
    steps += [layer(x[:, t:t + 8], cache=cache) for t in (14, 22)]  # chunked prefill continues it
    assert rel_err(torch.cat(steps, 1), full) < 1e-10


def test_sinks_equal_sliding_window_without_sinks_and_dense_when_wide():
    q, k, v = inputs(Lq=50, Lk=50)
    a = ak.attend(q, k, v, is_causal=True, enable_gqa=True, method="sinks", sinks=0, window=9)
    b = ak.attend(q, k, v, is_causal=True, enable_gqa=True, method="sliding_window", window=9)
    assert rel_err(a, b) < 1e-13
    wide = ak.attend(q, k, v, is_causal=True, enable_gqa=True, method="sinks", sinks=10, window=40)
    assert rel_err(wide, ak.attend(q, k, v, is_causal=True, enable_gqa=True)) < 1e-13


MEMORY = textwrap.dedent("""
    import resource, torch, attnkit as ak
    torch.manual_seed(0)
    L = 16384
    q, k, v = (torch.randn(1, 4, L, 64) for _ in range(3))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = ak.attend(q, k, v, is_causal=True, method="sinks", sinks=4, window=256)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    plan = ak.patterns.sinks(4, 256).block_plan(L, L, 128)
    print(plan.tile_density(), (after - before) / 1024)
""")


def test_sinks_16k_on_cpu_stays_memory_lean():
    proc = subprocess.run([sys.executable, "-c", MEMORY], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    density, grown_mib = map(float, proc.stdout.split()[-2:])
    assert density < 0.04  # the sink column and the diagonal band only
    assert grown_mib < 1024, grown_mib  # one dense 16k x 16k x 4-head fp32 score tensor is 4 GiB


# -- semantics and errors ----------------------------------------------------------------------
def test_prefix_lm_semantics():
    m = ak.patterns.prefix_lm(3).to_dense(6)
    assert m[0, :3].all() and not m[0, 3:].any() and m[4, :5].all() and not m[4, 5]
    per_batch = ak.patterns.prefix_lm(torch.tensor([0, 4])).to_dense(5)
    assert torch.equal(per_batch[0, 0], ak.patterns.causal().to_dense(5))
    assert torch.equal(per_batch[1, 0], ak.patterns.prefix_lm(4).to_dense(5))
    q, k, v = inputs(B=2, Lq=9)
    with pytest.raises(ak.UnsupportedPatternError, match="noncausal"):
        ak.attend(q, k, v, is_causal=True, enable_gqa=True, method="prefix_lm", prefix=3)
    with pytest.raises(ak.OptionError, match="needs prefix"):
        ak.attend(q, k, v, enable_gqa=True, method="prefix_lm")
    with pytest.raises(ak.ShapeError, match="batch"):
        ak.attend(q, k, v, enable_gqa=True, method="prefix_lm", prefix=torch.tensor([1, 2, 3]))


def test_document_ids_lengths_and_pairs_agree():
    q, k, v = inputs(B=2, Lq=12, Lk=12)
    ids = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2, 2, 3, 3])
    for causal in (False, True):
        run = lambda **o: ak.attend(q, k, v, is_causal=causal, enable_gqa=True, method="document",  # noqa: E731
                                    block_size=16, **o)
        a, b = run(document_ids=ids), run(lengths=[3, 2, 5, 2])
        c = run(q_document_ids=ids, k_document_ids=ids)
        assert rel_err(a, b) < 1e-14 and rel_err(a, c) < 1e-14
    m = ak.patterns.document(ids).to_dense(12)
    assert m[3, 4] and not m[3, 2] and not m[4, 5]


def test_document_errors_name_the_fix():
    q, k, v = inputs(Lq=9, Lk=6)
    with pytest.raises(ak.OptionError, match="q_document_ids"):
        ak.attend(q, k, v, enable_gqa=True, method="document", lengths=[6, 6])
    with pytest.raises(ak.OptionError, match="exactly one"):
        ak.attend(q, k, v, enable_gqa=True, method="document", lengths=[9], document_ids=torch.zeros(9))
    q, k, v = inputs(Lq=9)
    with pytest.raises(ak.ShapeError, match="every key needs a document"):
        ak.attend(q, k, v, enable_gqa=True, method="document", lengths=[3, 4])
    with pytest.raises(ak.OptionError, match="integer tensor"):
        ak.attend(q, k, v, enable_gqa=True, method="document", document_ids=torch.zeros(9))


def test_shifted_groups_errors():
    q, k, v = inputs(Lq=16)
    with pytest.raises(ak.OptionError, match="future tokens"):
        ak.attend(q, k, v, is_causal=True, enable_gqa=True, method="shifted_groups", group_size=4, variant="roll")
    with pytest.raises(ak.OptionError, match="even G"):
        ak.attend(q, k, v, enable_gqa=True, method="shifted_groups", group_size=3, variant="roll")
    q1, k1, v1 = inputs(Lq=1, Lk=16)
    with pytest.raises(ak.OptionError, match="pass group_size"):
        ak.attend(q1, k1, v1, is_causal=True, enable_gqa=True, method="shifted_groups")
    with pytest.raises(ak.UnsupportedPatternError):
        ak.attend(q1, k1, v1, enable_gqa=True, method="shifted_groups", group_size=4)


def test_shifted_groups_ratio_and_heads():
    p = ak.patterns.shifted_groups(heads=4, group_size_ratio=0.25)
    m = p.to_dense(16)  # G = 4, shift 2 on heads 2, 3
    assert torch.equal(m[0], m[1]) and torch.equal(m[2], m[3]) and not torch.equal(m[0], m[2])
    assert m[0, 5, 4] and not m[0, 4, 3] and m[2, 4, 2] and not m[2, 2, 1]
    odd = ak.patterns.shifted_groups(4, heads=3).to_dense(8)
    assert torch.equal(odd[0], odd[1]) and not torch.equal(odd[1], odd[2])  # the last 3 // 2 heads shift


def test_s2_errors_and_gqa_groups_share_a_pattern():
    q, k, v = inputs(H=8, Hkv=2, Lq=40)
    with pytest.raises(ak.OptionError, match="num_dense_heads"):
        ak.attend(q, k, v, enable_gqa=True, method="s2", num_dense_heads=3)
    with pytest.raises(ak.OptionError, match="homo_head"):
        ak.attend(q, k, v, enable_gqa=True, method="s2", num_dense_heads=1, homo_head=True)
    m = ak.patterns.s2(8, kv_heads=2, sparse_block_size=2, local_blocks=1, vert_stride=4).to_dense(40)
    assert all(torch.equal(m[h], m[4 * (h // 4)]) for h in range(8)) and not torch.equal(m[0], m[4])


def test_relative_errors_and_zero_table_is_plain_attention():
    q, k, v = inputs(Lq=20, D=8)
    with pytest.raises(ak.OptionError, match="needs embeddings"):
        ak.attend(q, k, v, enable_gqa=True, method="relative")
    with pytest.raises(ak.OptionError, match="odd number"):
        ak.attend(q, k, v, enable_gqa=True, method="relative", embeddings=torch.zeros(4, 8, dtype=torch.float64))
    with pytest.raises(ak.OptionError, match="heads of D=8"):
        ak.attend(q, k, v, enable_gqa=True, method="relative", embeddings=torch.zeros(5, 6, dtype=torch.float64))
    zero = torch.zeros(7, 8, dtype=torch.float64)
    for causal in (False, True):
        out = ak.attend(q, k, v, is_causal=causal, enable_gqa=True, method="relative", embeddings=zero,
                        block_size=16)
        assert rel_err(out, ak.attend(q, k, v, is_causal=causal, enable_gqa=True)) < 1e-13


def test_relative_score_mod_on_blocksparse_tiles_equals_gather():
    """The engines' form on a 6-D tile grid (query blocks x rows x key tiles x columns) equals
    q_i . E[j - i + center] gathered pair by pair."""
    from attnkit.patterns.relative import relative_score_mod

    B, H, C, bq, M, bk, D, R = 2, 3, 3, 4, 2, 5, 6, 40
    table, query = torch.randn(H, R, D, dtype=torch.float64), torch.randn(B, H, C * bq, D, dtype=torch.float64)
    q = torch.arange(C * bq).view(1, 1, C, bq, 1, 1)
    tiles = torch.randint(0, 4, (B, H, C, 1, M, 1))
    k = tiles * bk + torch.arange(bk).view(1, 1, 1, 1, 1, bk)
    b, h = torch.arange(B).view(B, 1, 1, 1, 1, 1), torch.arange(H).view(1, H, 1, 1, 1, 1)
    got = relative_score_mod(3, 20, 0.5)(torch.zeros(B, H, C, bq, M, bk, dtype=torch.float64), b, h, q, k,
                                          query, table)
    idx = k - (q + 3) + 20
    E = table[h, idx.clamp(0, R - 1)] * ((idx >= 0) & (idx < R)).unsqueeze(-1)
    want = 0.5 * (query[b, h, q] * E).sum(-1)
    assert rel_err(got, want) < 1e-13


RELATIVE_MEMORY = textwrap.dedent("""
    import resource, torch, attnkit as ak
    torch.manual_seed(0)
    L = 16384
    q, k, v = (torch.randn(1, 4, L, 64) for _ in range(3))
    E = torch.randn(4, L, 64) * 0.1
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = ak.attend(q, k, v, is_causal=True, method="relative", embeddings=E, window=256)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print((after - before) / 1024)
""")


@pytest.mark.slow
def test_relative_16k_window_on_cpu_stays_memory_lean():
    proc = subprocess.run([sys.executable, "-c", RELATIVE_MEMORY], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr
    assert float(proc.stdout.split()[-1]) < 1024  # the gather form alone would be L x 256 x 4 x 64 fp32 = 4 GiB
