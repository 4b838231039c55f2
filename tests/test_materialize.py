"""``ak.analysis.materialize``: for every registered method with the hook, the implicit attention
matrix times v reproduces the method's output; methods without it raise a clear error."""

import numpy as np
import pytest
import torch

import attnkit as ak
from attnkit.call import PATTERNS
from attnkit.registry import get_method
from helpers import functional_methods, inputs, rel_err

HOOKED = [m for m in functional_methods() if getattr(get_method(m), "materialize", None) is not None]
UNHOOKED = [m for m in functional_methods() if m not in HOOKED]


def test_the_linear_family_has_the_hook():
    assert {"linear", "lightning", "based", "flow", "aaren", "lightnet"} <= set(HOOKED)


@pytest.mark.parametrize("name", HOOKED)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_materialize_times_v_is_the_output(name, dtype):
    info = ak.method_info(name)
    impl = get_method(name)
    for pattern in PATTERNS:
        if pattern not in info.patterns:
            continue
        causal = pattern.startswith("causal")
        lq, lk = (27, 27) if pattern.endswith("self") else (19, 27)
        q, k, v = inputs(B=2, H=4, Hkv=2, Lq=lq, Lk=lk, D=8, Dv=5, dtype=dtype, seed=3)
        opts = impl.sample_options(np.random.default_rng(7), lq, lk)
        w = ak.analysis.materialize(name, q, k, v, is_causal=causal, enable_gqa=True, **opts)
        assert w.shape == (2, 4, lq, lk)
        out = ak.attend(q, k, v, is_causal=causal, enable_gqa=True, method=name, **opts)
        want = w.double() @ v.double().repeat_interleave(2, 1)
        assert rel_err(out, want) <= (1e-9 if dtype == torch.float64 else 1e-4), (pattern, opts)
        if causal:  # nothing above the (bottom-right) diagonal
            off = lk - lq
            future = torch.arange(lk)[None, :] > torch.arange(lq)[:, None] + off
            assert float(w[..., future].abs().max() if future.any() else 0) == 0


def test_methods_without_the_hook_raise_a_clear_error():
    q, k, v = inputs(Lq=8)
    name = UNHOOKED[0] if UNHOOKED else "dense"
    with pytest.raises(ak.ArgumentError, match="no implicit-attention hook.*Methods with one: .*lightning"):
        ak.analysis.materialize(name, q, k, v, enable_gqa=True)


def test_materialize_validates_like_attend():
    q, k, v = inputs(Lq=8)
    with pytest.raises(ak.OptionError, match="no option 'windw'"):
        ak.analysis.materialize("lightning", q, k, v, enable_gqa=True, windw=3)
    with pytest.raises(ak.UnsupportedPatternError):
        ak.analysis.materialize("flow", q, k[:, :, :5], v[:, :, :5], is_causal=True, enable_gqa=True)


def test_lightning_matrix_is_the_decayed_score_matrix():
    q, k, v = inputs(B=1, H=2, Hkv=2, Lq=6, D=4)
    w = ak.analysis.materialize("lightning", q, k, v, is_causal=True, scale=1.0, slopes=torch.tensor([0.5, 0.0]))
    s = q @ k.transpose(-1, -2)
    i, j = 4, 1
    assert torch.allclose(w[0, 0, i, j], s[0, 0, i, j] * torch.exp(torch.tensor(-0.5 * 3, dtype=torch.float64)))
    assert torch.allclose(w[0, 1, i, j], s[0, 1, i, j])
