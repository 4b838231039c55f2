"""The ``varlen`` engine (backends/varlen.py): per-query block selections computed on the kept
key blocks only. Once a selection is fixed, the output and the q/k/v gradients equal the float64
oracle with the selection's mask (GQA, scale, B > 1, bf16, key_shift, empty rows, awkward
lengths, chunked queries); any other pattern gets a reason from ``can_run``; ``auto`` takes it on
CPU only where its cost rule predicts it beats blocksparse; memory follows the kept blocks."""

import subprocess
import sys
import textwrap

import pytest
import torch

import attnkit as ak
from attnkit.backends import varlen as varlen_mod
from attnkit.backends.varlen import VarlenEngine
from attnkit.backends.mask_spec import MaskSpec
from attnkit.call import AttentionCall
from attnkit.patterns import BlockSelection, BlockWindow
from attnkit.patterns.interval import Full, SlidingWindow
from helpers import inputs, rel_err

OPTS = {"moba": {"chunk_size": 7, "density": 0.3}, "kinetics": {"chunk_size": 5, "sink": 2, "local": 3, "density": 0.3},
        "vmoba": {"density": 0.3}}


pytestmark = pytest.mark.usefixtures("one_thread")


def run_pattern(pattern, q, k, v, causal=False, scale=None):
    call = AttentionCall.build(q, k, v, None, 0.0, causal, scale, q.shape[1] != k.shape[1])
    spec = MaskSpec(pattern)
    assert VarlenEngine().can_run(call, spec) is None
    return VarlenEngine().run(call, spec)


def random_selection(B, H, Lq, Lk, bk, shift=0, p=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = -(-(Lk + shift) // bk)
    return BlockSelection(torch.rand(B, H, Lq, n, generator=g) < p, 1, bk, key_shift=shift)


@pytest.mark.parametrize("name", ["moba", "kinetics", "vmoba"])
@pytest.mark.parametrize("L", [1, 63, 500])
def test_methods_equal_oracle_on_their_selection(name, L):
    q, k, v = inputs(B=2, H=4, Hkv=2, Lq=L, D=48, seed=L)
    causal = name != "vmoba"
    opts = dict(OPTS[name], grid=(1, 1, L)) if name == "vmoba" else OPTS[name]
    sel = ak.select(q, k, v, is_causal=causal, enable_gqa=True, scale=0.3, method=name, **opts)
    want = ak.reference(q, k, v, mask=sel.mask(), scale=0.3)
    got = ak.attend(q, k, v, is_causal=causal, enable_gqa=True, scale=0.3, method=name, backend="varlen", **opts)
    assert rel_err(got, want) <= 1e-12
    assert rel_err(sel.attend(q, k, v, scale=0.3, backend="varlen"), want) <= 1e-12


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("lq,lk,bk,shift", [(1, 1, 1, 0), (9, 30, 4, 0), (30, 9, 4, 3), (37, 37, 5, 2),
                                             (16, 40, 40, 0), (12, 9, 16, 3)])  # last: one block past the keys
def test_block_selections_with_shift_causal_and_empty_rows(causal, lq, lk, bk, shift):
    q, k, v = inputs(B=2, H=3, Hkv=1, Lq=lq, Lk=lk, D=8, Dv=5, seed=3, grad=True)
    sel = random_selection(1, 3, lq, lk, bk, shift, seed=lq)
    pattern = sel & Full(causal=True) if causal else sel
    mask = pattern.dense(lq, lk)
    got = run_pattern(pattern, q, k, v, causal=causal)
    ref = ak.reference(q, k, v, mask=mask)
    assert torch.isfinite(got).all()
    assert rel_err(got, ref) <= 1e-12
    empty = ~mask.expand(2, 3, lq, lk).any(-1)
    assert (got[empty] == 0).all()
    w = torch.randn_like(ref)
    grads = torch.autograd.grad((got * w).sum(), (q, k, v))
    for g, r in zip(grads, torch.autograd.grad((ref * w).sum(), (q, k, v))):
        assert torch.isfinite(g).all() and rel_err(g, r) <= 1e-12
    assert (grads[0][empty] == 0).all()  # rows that see nothing get no gradient


def test_fully_masked_selection_gives_zeros_and_zero_grads():
    q, k, v = inputs(B=1, H=2, Hkv=2, Lq=10, D=8, grad=True)
    pattern = BlockSelection(torch.zeros(1, 1, 10, 3, dtype=torch.bool), 1, 4)
    out = run_pattern(pattern, q, k, v)
    assert (out == 0).all()
    out.sum().backward()
    assert all((t.grad == 0).all() for t in (q, k, v))


@pytest.mark.parametrize("budget", [1, 2 * 4 * 6 * 16 * 3])  # one piece per batch / a few rows per chunk
def test_chunked_queries_equal_one_chunk(monkeypatch, budget):
    q, k, v = inputs(B=2, H=4, Hkv=2, Lq=70, D=16, seed=5, grad=True)
    pattern = random_selection(2, 4, 70, 70, 6, 1, seed=5) & Full(causal=True)
    ref = ak.reference(q, k, v, mask=pattern.dense(70, 70))
    w = torch.randn_like(ref)
    want = torch.autograd.grad((ref * w).sum(), (q, k, v))
    monkeypatch.setattr(varlen_mod, "VARLEN_BUDGET", budget)
    out = run_pattern(pattern, q, k, v, causal=True)
    assert rel_err(out, ref) <= 1e-12
    for g, r in zip(torch.autograd.grad((out * w).sum(), (q, k, v)), want):
        assert rel_err(g, r) <= 1e-12


def test_gradcheck_float64():
    q, k, v = inputs(B=1, H=2, Hkv=1, Lq=9, D=4, grad=True, seed=6)
    pattern = random_selection(1, 2, 9, 9, 2, 1, p=0.5, seed=6) & Full(causal=True)
    assert torch.autograd.gradcheck(lambda a, b, c: run_pattern(pattern, a, b, c, causal=True, scale=0.7),
                                    (q, k, v))


@pytest.mark.parametrize("name", ["moba", "kinetics"])
def test_float32_gradients_match_oracle(name):
    q, k, v = inputs(B=2, H=4, Hkv=2, Lq=63, D=48, dtype=torch.float32, grad=True, seed=7)
    sel = ak.select(q, k, v, is_causal=True, enable_gqa=True, method=name, **OPTS[name])
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = ak.reference(q64, k64, v64, mask=sel.mask())
    w = torch.randn_like(ref)
    want = torch.autograd.grad((ref * w).sum(), (q64, k64, v64))
    out = ak.attend(q, k, v, is_causal=True, enable_gqa=True, method=name, backend="varlen", **OPTS[name])
    assert out.dtype == torch.float32 and rel_err(out, ref) <= 1e-5
    for g, r in zip(torch.autograd.grad((out * w.float()).sum(), (q, k, v)), want):
        assert rel_err(g, r) <= 1e-4


def test_bfloat16_computes_in_float32():
    q, k, v = inputs(B=1, H=4, Hkv=2, Lq=64, D=16, dtype=torch.bfloat16, seed=8, grad=True)
    sel = ak.select(q, k, v, is_causal=True, enable_gqa=True, method="moba", **OPTS["moba"])
    out = ak.attend(q, k, v, is_causal=True, enable_gqa=True, method="moba", backend="varlen", **OPTS["moba"])
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = ak.reference(q64, k64, v64, mask=sel.mask())
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert rel_err(out, ref) <= 1e-2
    w = torch.randn_like(ref)
    want = torch.autograd.grad((ref * w).sum(), (q64, k64, v64))
    for g, r in zip(torch.autograd.grad((out * w.bfloat16()).sum(), (q, k, v)), want):
        assert g.dtype == torch.bfloat16 and rel_err(g, r) <= 2e-2


def test_other_patterns_get_a_reason_that_names_the_fix():
    q, k, v = inputs(B=1, H=2, Hkv=2, Lq=12, D=8)
    call = AttentionCall.build(q, k, v, None, 0.0, True, None, False)
    sel = random_selection(1, 2, 12, 12, 3)
    engine = VarlenEngine()
    reason = engine.can_run(call, MaskSpec(BlockSelection(torch.ones(3, 4, dtype=torch.bool), 4, 3)))
    assert "block_q=4" in reason and "block_q=1" in reason and "backend='blocksparse'" in reason
    for pattern in [Full(causal=True), SlidingWindow(2, 0, True) & sel,
                    (sel | BlockWindow(3, 1)) & Full(causal=True)]:  # hip's form
        reason = engine.can_run(call, MaskSpec(pattern))
        assert pattern.describe() in reason and "per-query BlockSelection" in reason and "backend=" in reason
    assert "score_mod" in engine.can_run(call, MaskSpec(sel, score_mod=lambda s, *a: s))
    masked = AttentionCall.build(q, k, v, torch.ones(12, 12, dtype=torch.bool), 0.0, False, None, False)
    assert "attn_mask=None" in engine.can_run(masked, MaskSpec(sel))
    dropped = AttentionCall.build(q, k, v, None, 0.1, False, None, False)
    assert "dropout_p=0.1" in engine.can_run(dropped, MaskSpec(sel))
    # methods whose selection is not per query do not list the engine
    assert "varlen" not in ak.method_info("hip").backends and "varlen" in ak.method_info("moba").backends
    with pytest.raises(ak.BackendUnavailableError, match="varlen"):
        ak.attend(q, k, v, is_causal=True, method="h2o", backend="varlen")
    assert ak.explain(q, k, v, is_causal=True, method="hip").backend == "blocksparse"


def test_auto_takes_varlen_on_cpu_where_it_beats_blocksparse():
    q, k, v = inputs(B=1, H=2, Hkv=1, Lq=256, D=8, dtype=torch.float32)
    sparse = dict(is_causal=True, enable_gqa=True, method="moba", chunk_size=16, density=0.2)
    why = ak.explain(q, k, v, **sparse)
    assert why.backend == "varlen" and "only when named" in dict(why.candidates)["flex"]
    assert ak.select(q, k, v, **sparse).attend(q, k, v).equal(ak.attend(q, k, v, **sparse, backend="varlen"))
    assert ak.explain(q, k, v, is_causal=True, enable_gqa=True, method="moba", chunk_size=64,
                      density=1.0).backend == "varlen"  # blocks of 64: any share
    for dense in (dict(chunk_size=2, density=0.3), dict(chunk_size=16, density=1.0)):  # small blocks, many kept
        why = ak.explain(q, k, v, is_causal=True, enable_gqa=True, method="moba", **dense)
        reason = dict(why.candidates)["varlen"]
        assert why.backend == "blocksparse" and "only when named" in reason and "blocks of" in reason
    meta = AttentionCall.build(*(t.to("meta") for t in (q, k, v)), None, 0.0, True, None, True)
    assert "CPU only" in VarlenEngine().auto_skip(meta, MaskSpec(random_selection(1, 2, 256, 256, 16)))


MEMORY_SCRIPT = textwrap.dedent("""
    import resource, torch, attnkit as ak
    torch.manual_seed(0)
    L = 16384
    q = torch.randn(1, 2, L, 16, requires_grad=True)
    k, v = (torch.randn(1, 1, L, 16, requires_grad=True) for _ in range(2))
    sel = ak.select(q, k, v, is_causal=True, enable_gqa=True, method="moba", chunk_size=256, top_k=2)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    sel.attend(q, k, v, backend="varlen").sum().backward()
    print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)
""")


@pytest.mark.slow
def test_16k_forward_and_backward_never_build_an_l_by_l_tensor():
    proc = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    grown_mib = float(proc.stdout.strip().splitlines()[-1])
    assert grown_mib < 512, grown_mib  # one 16k x 16k fp32 score matrix alone is 1 GiB
