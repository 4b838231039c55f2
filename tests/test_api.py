"""ak.attend(method='dense') is a drop-in for SDPA; attnkit's own conventions are tested both sides."""

import pytest
import torch
import torch.nn.functional as F

import attnkit as ak
from helpers import inputs, rel_err

CASES = [
    dict(B=2, H=4, Hkv=4, Lq=63, Lk=63, D=48),  # D = 48
    dict(B=1, H=4, Hkv=2, Lq=63, Lk=63, D=32),  # GQA
    dict(B=2, H=2, Hkv=2, Lq=17, Lk=40, D=32, Dv=24),  # cross, Dv != D
    dict(B=1, H=2, Hkv=1, Lq=1, Lk=1, D=16),  # L = 1, MQA
    dict(B=1, H=2, Hkv=2, Lq=1, Lk=33, D=16),  # one decode step
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("mask_kind", [None, "bool", "float"])
@pytest.mark.parametrize("scale", [None, 0.3])
def test_dense_matches_sdpa(case, dtype, mask_kind, scale):
    q, k, v = inputs(**case, dtype=dtype)
    gqa = case["H"] != case["Hkv"]
    mask = None
    if mask_kind == "bool":
        mask = torch.rand(case["Lq"], case["Lk"]) > 0.3
        mask[:, 0] = True  # SDPA gives NaN on empty rows; keep every row non-empty for parity
    elif mask_kind == "float":
        mask = torch.randn(1, case["H"], case["Lq"], case["Lk"], dtype=dtype)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)
    got = ak.attend(q, k, v, mask, scale=scale, enable_gqa=gqa)
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    assert rel_err(got, want) <= tol


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dense_causal_self_matches_sdpa(dtype):
    q, k, v = inputs(Lq=63, dtype=dtype)
    want = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    got = ak.attend(q, k, v, is_causal=True, enable_gqa=True)
    assert rel_err(got, want) <= (1e-12 if dtype == torch.float64 else 2e-6)


def test_causal_cross_is_bottom_right_not_sdpa_top_left():
    q, k, v = inputs(Lq=5, Lk=12, Hkv=4)
    got = ak.attend(q, k, v, is_causal=True)
    bottom_right = torch.ones(5, 12, dtype=torch.bool).tril(diagonal=12 - 5)
    top_left = torch.ones(5, 12, dtype=torch.bool).tril()
    assert rel_err(got, F.scaled_dot_product_attention(q, k, v, attn_mask=bottom_right)) < 1e-12
    assert rel_err(got, F.scaled_dot_product_attention(q, k, v, is_causal=True)) > 1e-3  # SDPA: top-left
    assert rel_err(got, F.scaled_dot_product_attention(q, k, v, attn_mask=top_left)) > 1e-3


def test_causal_with_more_queries_than_keys_gives_zero_rows():
    q, k, v = inputs(Lq=12, Lk=5, Hkv=4, grad=True)
    out = ak.attend(q, k, v, is_causal=True)
    assert torch.all(out[:, :, :7] == 0)  # queries 0..6 sit before the first key
    assert rel_err(out, ak.reference(q, k, v, is_causal=True)) < 1e-12
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


@pytest.mark.parametrize("method,opts", [("dense", {}), ("sliding_window", {"window": 3}), ("linear", {})])
def test_fully_masked_rows_are_zero_with_finite_grads(method, opts):
    q, k, v = inputs(Lq=20, Hkv=4, grad=True)
    mask = torch.ones(20, 20, dtype=torch.bool)
    mask[3] = False
    kwargs = {} if method == "linear" else {"attn_mask": mask}
    out = ak.attend(q, k, v, method=method, **kwargs, **opts)
    if method != "linear":
        assert torch.all(out[:, :, 3] == 0)
    assert torch.isfinite(out).all()
    out.square().sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


def test_float_mask_all_neg_inf_row_is_zero():
    q, k, v = inputs(Lq=8, Hkv=4)
    mask = torch.zeros(8, 8, dtype=torch.float64)
    mask[2] = float("-inf")
    out = ak.attend(q, k, v, mask)
    assert torch.all(out[:, :, 2] == 0) and torch.isfinite(out).all()


def test_causal_and_mask_combine():
    q, k, v = inputs(Lq=16, Hkv=4)
    mask = torch.rand(16, 16) > 0.5
    got = ak.attend(q, k, v, mask, is_causal=True)
    want = ak.reference(q, k, v, mask=mask, is_causal=True)
    assert rel_err(got, want) < 1e-12


def test_dropout_runs_and_is_off_at_zero():
    q, k, v = inputs(Lq=16, Hkv=4, dtype=torch.float32)
    torch.manual_seed(1)
    a = ak.attend(q, k, v, dropout_p=0.5)
    assert a.shape == (2, 4, 16, 48) and torch.isfinite(a).all()
    assert not torch.allclose(a, ak.attend(q, k, v))


def test_bfloat16_dense():
    q, k, v = inputs(Lq=63, dtype=torch.bfloat16)
    got = ak.attend(q, k, v, is_causal=True, enable_gqa=True)
    assert got.dtype == torch.bfloat16
    assert rel_err(got, ak.reference(q, k, v, is_causal=True)) < 3e-2


def test_oracle_backend_and_explain():
    q, k, v = inputs(Lq=9, Hkv=4, dtype=torch.float32)
    out = ak.attend(q, k, v, backend="oracle")
    assert rel_err(out, ak.reference(q, k, v)) < 1e-6
    why = ak.explain(q, k, v)
    assert why.backend == "sdpa" and "sdpa_cudnn" in str(why)
    assert "CUDA" in dict(why.candidates)["sdpa_cudnn"]


def test_pattern_argument_runs_a_pattern_object():
    q, k, v = inputs(Lq=40, Hkv=4)
    p = ak.patterns.sliding_window(left=3, right=2) | ak.patterns.sliding_window(left=20, right=-18)
    got = ak.attend(q, k, v, pattern=p, is_causal=True)
    want = ak.reference(q, k, v, mask=p.to_dense(40, 40), is_causal=True)
    assert rel_err(got, want) < 1e-12


def test_readme_tour_runs():
    """The README's short tour, as written."""
    import re
    from pathlib import Path

    text = (Path(__file__).parents[1] / "README.md").read_text()
    tour = re.search(r"## A short tour\s+```python\n(.*?)```", text, re.S)
    assert tour, "README.md has no short tour"
    exec(compile(tour.group(1), "README.md tour", "exec"), {})
