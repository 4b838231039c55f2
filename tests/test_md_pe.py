"""LightNet's position encodings in ``ak.nn``: MD-LRPE is relative per grid axis; MD-TPE mixes
along each axis, is causal when asked, and trains."""

import pytest
import torch

import attnkit as ak


def test_grid_coordinates_are_row_major_with_prefix_tokens():
    c = ak.nn.grid_coordinates((2, 3), 7, prefix=1)
    assert c.tolist() == [[0, 0], [0, 0], [0, 1], [0, 2], [1, 0], [1, 1], [1, 2]]
    with pytest.raises(ak.ShapeError, match="holds 6 tokens"):
        ak.nn.grid_coordinates((2, 3), 5)


def test_md_lrpe_scores_depend_only_on_relative_offsets():
    lrpe = ak.nn.MdLrpe(12, 3)
    q, k = torch.randn(1, 1, 1, 12, dtype=torch.float64), torch.randn(1, 1, 1, 12, dtype=torch.float64)
    p, r = torch.tensor([[2, 5, 1]]), torch.tensor([[0, 3, 4]])
    shift = torch.tensor([[7, -2, 11]])
    a = (lrpe(q, p) * lrpe(k, r)).sum()
    b = (lrpe(q, p + shift) * lrpe(k, r + shift)).sum()
    assert torch.allclose(a, b, rtol=1e-12)
    assert not torch.allclose(a, (lrpe(q, p) * lrpe(k, r + shift)).sum())


def test_md_tpe_mixes_along_each_axis_causally():
    torch.manual_seed(0)
    tpe = ak.nn.MdTpe(16, 2, axes=2, causal=True).double()
    x = torch.randn(1, 12, 16, dtype=torch.float64)
    y = tpe(x, (3, 4))
    x2 = x.clone()
    x2[:, 11] += 1.0  # the last token (row 2, col 3) is after every other token on both axes
    assert torch.allclose(tpe(x2, (3, 4))[:, :11], y[:, :11], atol=1e-12)
    x3 = x.clone()
    x3[:, 0] += 1.0  # token (0, 0) reaches its row and its column only
    changed = (tpe(x3, (3, 4)) - y).abs().amax(-1)[0] > 1e-12
    assert changed.tolist() == [True, True, True, True, True, False, False, False, True, False, False, False]
    y.square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in tpe.parameters())
