"""The linear method: three forms agree to 1e-10 in float64 and equal an independent definition."""

import pytest
import torch
import torch.nn.functional as F

import attnkit as ak
from helpers import inputs, rel_err


def definition(q, k, v, causal, phi, scale):
    """Katharopoulos et al. written as plain loops over visible keys (float64)."""
    B, H, Lq, _ = q.shape
    Lk = k.shape[2]
    k = k.repeat_interleave(H // k.shape[1], 1)
    v = v.repeat_interleave(H // v.shape[1], 1)
    out = torch.zeros(B, H, Lq, v.shape[-1], dtype=torch.float64)
    for i in range(Lq):
        last = i + Lk - Lq if causal else Lk - 1
        if last < 0:
            continue
        w = (phi(q[:, :, i]) * scale)[:, :, None, :] * phi(k[:, :, : last + 1])
        w = w.sum(-1)
        out[:, :, i] = (w[..., None] * v[:, :, : last + 1]).sum(2) / (w.sum(-1, keepdim=True) + 1e-6)
    return out


PHI = {"elu": lambda x: F.elu(x) + 1, "relu": F.relu, "softplus": F.softplus}


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("lq,lk", [(50, 50), (20, 50), (50, 20), (1, 1)])
@pytest.mark.parametrize("fmap", list(PHI))
def test_three_forms_agree_and_match_definition(causal, lq, lk, fmap):
    q, k, v = inputs(Lq=lq, Lk=lk, D=12, Dv=7)
    forms = {b: ak.attend(q, k, v, is_causal=causal, enable_gqa=True, method="linear", backend=b,
                          feature_map=fmap, chunk_size=8) for b in ("parallel", "chunked", "recurrent")}
    for b in ("chunked", "recurrent"):
        assert rel_err(forms[b], forms["parallel"]) <= 1e-10
    assert rel_err(forms["parallel"], definition(q, k, v, causal, PHI[fmap], 12 ** -0.5)) <= 1e-10


def test_chunked_gradients_equal_parallel():
    q, k, v = inputs(Lq=33, D=8, grad=True)
    for b in ("parallel", "chunked", "recurrent"):
        out = ak.attend(q, k, v, is_causal=True, enable_gqa=True, method="linear", backend=b, chunk_size=5)
        g = torch.autograd.grad(out.square().sum(), (q, k, v))
        if b == "parallel":
            ref = g
        else:
            assert all(rel_err(a, r) <= 1e-10 for a, r in zip(g, ref))


def test_state_continues_across_chunks():
    from attnkit.api import _dispatch
    from attnkit.registry import get_method

    q, k, v = inputs(Lq=40, Hkv=4, D=8)
    impl = get_method("linear")
    full = ak.attend(q, k, v, is_causal=True, method="linear")
    state = impl.init_state(2, 4, 8, 8, dtype=torch.float64, device="cpu", options={})
    outs = []
    for a, b in ((0, 13), (13, 14), (14, 40)):
        _, call, _, _ = _dispatch(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], None, 0.0, True, None, False,
                                  "linear", "auto", None, {})
        out, state = impl.forward_state(call, state)
        outs.append(out)
    assert rel_err(torch.cat(outs, 2), full) <= 1e-10
