"""ak.nn.Attention and ak.models: projections, GQA, RoPE, cross-attention, caches."""

import pytest
import torch

import attnkit as ak
from helpers import rel_err


@pytest.mark.parametrize("method,opts", [("dense", {}), ("sliding_window", {"window": 4}), ("linear", {})])
def test_causal_lm_generation_uses_caches(method, opts):
    torch.manual_seed(0)
    lm = ak.models.CausalLM(30, dim=32, depth=2, heads=4, kv_heads=2, method=method, **opts).double()
    x = torch.randint(0, 30, (2, 11))
    full = lm(x)
    caches = lm.init_caches(2)
    stepped = torch.cat([lm(x[:, :3], caches)] + [lm(x[:, t:t + 1], caches) for t in range(3, 11)], 1)
    assert rel_err(stepped, full) < 1e-9
    assert lm.generate(x[:, :4], 5).shape == (2, 9)


def test_cross_attention_layer_and_cache():
    layer = ak.nn.Attention(16, 4, cross=True, context_dim=24).double()
    x = torch.randn(2, 7, 16, dtype=torch.float64)
    ctx = torch.randn(2, 9, 24, dtype=torch.float64)
    full = layer(x, context=ctx)
    cache = layer.init_cache(2)
    first = layer(x[:, :1], context=ctx, cache=cache)
    rest = layer(x[:, 1:], cache=cache)  # context remembered
    assert rel_err(torch.cat([first, rest], 1), full) < 1e-12


def test_layer_rejects_bad_configuration():
    with pytest.raises(ak.ShapeError, match="kv_heads"):
        ak.nn.Attention(16, 4, kv_heads=3)
    with pytest.raises(ak.OptionError, match="window"):
        ak.nn.Attention(16, 4, method="sliding_window", windw=3)
    with pytest.raises(ak.ArgumentError, match="noncausal"):
        ak.nn.Attention(16, 4).init_cache(1)
    with pytest.raises(ak.ArgumentError, match="rope"):
        ak.nn.Attention(16, 4, rope=True, cross=True)


def test_rope_is_relative():
    from attnkit.nn import apply_rope

    q = torch.randn(1, 1, 1, 8, dtype=torch.float64)
    k = torch.randn(1, 1, 1, 8, dtype=torch.float64)
    s1 = apply_rope(q, torch.tensor([5])) @ apply_rope(k, torch.tensor([2])).transpose(-1, -2)
    s2 = apply_rope(q, torch.tensor([13])) @ apply_rope(k, torch.tensor([10])).transpose(-1, -2)
    assert torch.allclose(s1, s2)


def test_encoder_classifier_trains_a_step():
    model = ak.models.EncoderClassifier(20, 3, dim=16, heads=2, method="sliding_window", window=4)
    x = torch.randint(0, 20, (4, 12))
    loss = torch.nn.functional.cross_entropy(model(x), torch.tensor([0, 1, 2, 0]))
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_layer_method_refuses_settings_it_does_not_declare():
    with pytest.raises(ak.ArgumentError, match="rope=True"):
        ak.nn.Attention(32, 4, method="rat", causal=True, rope=True)
    ak.nn.Attention(32, 4, method="moh", causal=True, rope=True)  # moh declares it
    lm = ak.models.CausalLM(20, dim=32, heads=4, method="rat")  # models apply rope only where taken
    assert not lm.blocks[0].attn.rope
