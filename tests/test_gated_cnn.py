"""gated_cnn (MambaOut's Gated CNN as a 1-D token mixer): the official 2-D block on a one-row image,
causality, decoding in chunks, the token-by-token form, and the checks on its options."""

import pytest
import torch
import torch.nn.functional as F

import attnkit as ak
from helpers import rel_err


pytestmark = pytest.mark.usefixtures("one_thread")


def official_block_on_a_row(layer, x):
    """MambaOut's ``GatedCNNBlock.forward`` without norm / residual, on a ``(B, 1, L, C)`` image:
    ``split(fc1) -> (g, i, c)``, ``Conv2d(k x k, padding k // 2, groups=C)`` on ``c``, ``fc2(gelu(g) *
    cat(i, c))``. A k x k kernel whose only non-zero row is the middle one is our 1-D kernel."""
    g, i, c = torch.split(layer.fc1(x), layer.split, -1)
    K = layer.kernel_size
    kernel = torch.zeros(c.shape[-1], 1, K, K, dtype=x.dtype)
    kernel[:, 0, K // 2] = layer.conv.weight
    img = c[:, None].permute(0, 3, 1, 2)  # (B, C, 1, L)
    c = F.conv2d(img, kernel, layer.conv.bias, padding=K // 2, groups=c.shape[-1]).permute(0, 2, 3, 1)[:, 0]
    return layer.fc2(F.gelu(g) * torch.cat([i, c], -1))


@pytest.mark.parametrize("opts", [{}, {"kernel_size": 3, "conv_ratio": 0.5}, {"expansion": 2.0}])
def test_noncausal_equals_the_official_block_on_a_one_row_image(opts):
    torch.manual_seed(0)
    layer = ak.nn.Attention(24, 4, method="gated_cnn", **opts).double()
    x = torch.randn(2, 13, 24, dtype=torch.float64)
    assert rel_err(layer(x), official_block_on_a_row(layer.inner, x)) <= 1e-12
    inner = layer.inner
    hidden = int(opts.get("expansion", 8 / 3) * 24)
    assert inner.split == (hidden, hidden - int(opts.get("conv_ratio", 1.0) * 24), int(opts.get("conv_ratio", 1.0) * 24))


@pytest.mark.parametrize("opts", [{}, {"kernel_size": 4, "conv_ratio": 0.5}, {"conv_ratio": 0.0}])
def test_causal_decodes_in_chunks_and_the_recurrent_form_agrees(opts):
    torch.manual_seed(1)
    layer = ak.nn.Attention(16, 2, method="gated_cnn", causal=True, **opts).double()
    x = torch.randn(2, 19, 16, dtype=torch.float64)
    full = layer(x)
    x2 = x.clone()
    x2[:, 9:] += 5
    assert torch.equal(layer(x2)[:, :9], full[:, :9])
    cache = layer.init_cache(2)
    parts = [layer(x[:, a:b], cache=cache) for a, b in ((0, 1), (1, 3), (3, 4), (4, 12), (12, 19))]
    assert rel_err(torch.cat(parts, 1), full) <= 1e-12
    w = torch.randn_like(full)
    params = [p for p in layer.parameters() if p.numel()]
    ref = torch.autograd.grad((full * w).sum(), params)
    layer.inner.form = "recurrent"
    out = layer(x)
    assert rel_err(out, full) <= 1e-12
    got = torch.autograd.grad((out * w).sum(), params)
    assert all(rel_err(a, b) <= 1e-12 for a, b in zip(got, ref))


def test_receptive_field_of_the_centred_convolution():
    torch.manual_seed(2)
    layer = ak.nn.Attention(8, 1, method="gated_cnn", kernel_size=5).double()
    x = torch.randn(1, 20, 8, dtype=torch.float64)
    base = layer(x)
    x2 = x.clone()
    x2[:, 10] += 1
    changed = (layer(x2) - base).abs().amax(-1)[0] > 0
    assert changed.nonzero().flatten().tolist() == [8, 9, 10, 11, 12]


def test_gated_cnn_rejects_bad_configurations():
    with pytest.raises(ak.OptionError, match="odd kernel_size"):
        ak.nn.Attention(16, 2, method="gated_cnn", kernel_size=4)
    with pytest.raises(ak.OptionError, match="conv_ratio"):
        ak.nn.Attention(16, 2, method="gated_cnn", conv_ratio=3.0)
    with pytest.raises(ak.ArgumentError, match="cannot decode"):
        ak.nn.Attention(16, 2, method="gated_cnn").init_cache(1)
    with pytest.raises(ak.ArgumentError, match="cross"):
        ak.nn.Attention(16, 2, method="gated_cnn", cross=True)
    with pytest.raises(ak.ArgumentError, match="owns parameters"):
        q = torch.randn(1, 1, 4, 8)
        ak.attend(q, q, q, method="gated_cnn")
