"""Grid patterns in a tiled token order (patterns/grid_order.py, backends/reorder.py): the order, how
tokens move into it (gathers of runs of consecutive tokens), and engines running in it — outputs
and gradients against the float64 oracle, which never reorders."""

from __future__ import annotations

from math import prod

import pytest
import torch

import attnkit as ak
from attnkit.backends.reorder import Layout, run_length
from attnkit.patterns.grid_order import TiledGrid, grid_token_order, tiled_order
from helpers import rel_err, truth

pytestmark = pytest.mark.usefixtures("one_thread")

TOL = {torch.float64: 1e-10, torch.float32: 1e-5}
# (grid, kernel_size, block): each is run by the engines in a tiled order (checked below);
# the last has a tail (18 is not a multiple of the tile), so its runs are shorter than a tile row
CASES = [((16, 32), 7, 16), ((12, 20), 5, 16), ((4, 8, 8), (3, 3, 3), 16), ((10, 18), 7, 16)]


@pytest.mark.parametrize("grid,tile,run", [((8, 16), (4, 8), 8), ((4, 8, 8), (2, 4, 4), 4), ((6, 10), (3, 5), 5),
                                           ((10, 18), (4, 4), 2), ((5,), (5,), 5)])
def test_layout_moves_runs_of_the_order(grid, tile, run):
    order = tiled_order(grid, tile)
    assert run_length(order) == run
    starts = order[::run] // run
    layout = Layout(None, "", run, starts)
    x = torch.randn(2, 3, prod(grid), 5, requires_grad=True)
    moved = layout.into_order(x)
    assert torch.equal(moved, x.index_select(-2, order))
    assert torch.equal(layout.out_of_order(moved), x)
    g = torch.randn_like(moved)
    (grad,) = torch.autograd.grad(moved, x, g)
    assert torch.equal(grad, g.index_select(-2, torch.argsort(order)))


def test_run_length_of_any_permutation():
    assert run_length(torch.arange(12)) == 12
    assert run_length(torch.tensor([2, 3, 0, 1])) == 2
    assert run_length(torch.tensor([1, 2, 3, 0])) == 1  # runs must start at multiples of the run
    assert run_length(torch.tensor([3, 1, 2, 0])) == 1


@pytest.mark.parametrize("grid,kernel_size,block", CASES)
def test_tiled_pattern_is_the_pattern_in_that_order(grid, kernel_size, block):
    L = prod(grid)
    base = ak.patterns.neighborhood(grid=grid, kernel_size=kernel_size)
    order = grid_token_order(base, L, L, block)
    assert order is not None and isinstance(order.pattern, TiledGrid)
    tiled = order.pattern.to_dense(L, L)
    assert torch.equal(tiled, base.to_dense(L, L)[order.order][:, order.order])
    assert torch.equal(order.pattern.block_plan(L, L, block).states.flatten(),
                       ak.patterns.plan_from_dense(tiled, block, block).states.flatten())


@pytest.mark.parametrize("grid,kernel_size,block", CASES)
@pytest.mark.parametrize("engine", ["blocksparse"])  # flex: CPU forward only, in the slow test
def test_engine_in_tiled_order_matches_oracle(grid, kernel_size, block, engine):
    L = prod(grid)
    opts = dict(grid=grid, kernel_size=kernel_size, block_size=block)
    g = torch.Generator().manual_seed(L)
    base = [torch.randn(1, heads, L, 8, generator=g, dtype=torch.float64) for heads in (2, 1, 1)]  # GQA
    explained = ak.explain(*base, method="neighborhood", backend=engine, enable_gqa=True, **opts)
    assert "tokens reordered" in explained.details, explained.details
    mask = ak.patterns.neighborhood(grid=grid, kernel_size=kernel_size).to_dense(L, L)
    leaves = [t.clone().requires_grad_() for t in base]
    want = ak.reference(*leaves, mask=mask)
    w = torch.randn(want.shape, generator=g, dtype=torch.float64)
    want_grads = torch.autograd.grad((want * w).sum(), leaves)
    for dtype in (torch.float64, torch.float32):
        ins = [t.to(dtype).requires_grad_() for t in base]
        out = ak.attend(*ins, method="neighborhood", backend=engine, enable_gqa=True, **opts)
        assert rel_err(out, want) <= TOL[dtype], (dtype, rel_err(out, want))
        for got, ref in zip(torch.autograd.grad((out * w.to(dtype)).sum(), ins), want_grads):
            assert rel_err(got, ref) <= TOL[dtype]


@pytest.mark.slow
def test_flex_in_tiled_order_matches_oracle_on_cpu():
    """FlexAttention (forward only on CPU, ~25 s compile) in a tiled order with and without a tail."""
    for grid, kernel_size, block in (CASES[0], CASES[-1]):
        L = prod(grid)
        opts = dict(grid=grid, kernel_size=kernel_size, block_size=block)
        q, k, v = (torch.randn(1, 2, L, 16, generator=torch.Generator().manual_seed(i)) for i in range(3))
        assert "tokens reordered" in ak.explain(q, k, v, method="neighborhood", backend="flex", **opts).details
        with torch.no_grad():
            out = ak.attend(q, k, v, method="neighborhood", backend="flex", **opts)
        assert rel_err(out, truth("neighborhood", q, k, v, is_causal=False, **opts)) <= 1e-5


# -- tokens given in the tiled order (token_order='tiled'): nothing moves ---------------------------
@pytest.mark.parametrize("grid,kernel_size,block", CASES)
@pytest.mark.parametrize("engine", ["blocksparse", "dense"])
def test_tiled_tokens_run_without_moves_and_match(grid, kernel_size, block, engine):
    L = prod(grid)
    opts = dict(grid=grid, kernel_size=kernel_size, block_size=block)
    order = ak.token_order("neighborhood", L, **opts)
    assert "tokens reordered into" in order.description
    assert order.description in ak.explain(*(torch.zeros(1, 1, L, 8),) * 3, method="neighborhood",
                                           backend="blocksparse", **opts).details  # the engines' own order
    g = torch.Generator().manual_seed(L + 1)
    base = [torch.randn(1, heads, L, 8, generator=g, dtype=torch.float64) for heads in (2, 1, 1)]
    mask = ak.patterns.neighborhood(grid=grid, kernel_size=kernel_size).to_dense(L, L)
    leaves = [t.clone().requires_grad_() for t in base]
    want = ak.reference(*leaves, mask=mask)
    w = torch.randn(want.shape, generator=g, dtype=torch.float64)
    want_grads = torch.autograd.grad((want * w).sum(), leaves)
    tiled = [t[:, :, order.order].clone().requires_grad_() for t in base]
    if engine == "blocksparse":  # the dense engine has no token order to report
        assert "call's token order" in ak.explain(*tiled, method="neighborhood", backend=engine, enable_gqa=True,
                                                  token_order="tiled", **opts).details
    out = ak.attend(*tiled, method="neighborhood", backend=engine, enable_gqa=True, token_order="tiled", **opts)
    assert rel_err(out[:, :, order.inverse], want) <= 1e-10
    grads = torch.autograd.grad((out * w[:, :, order.order]).sum(), tiled)
    for got, ref in zip(grads, want_grads):
        assert rel_err(got[:, :, order.inverse], ref) <= 1e-10


def test_tiled_tokens_errors_name_the_way_out():
    with pytest.raises(ak.ArgumentError, match="no token_order option.*neighborhood"):
        ak.token_order("sliding_window", 512, left=3)
    with pytest.raises(ak.OptionError, match="no tiled order.*token_order='call'"):
        ak.token_order("neighborhood", 512, grid=(16, 32), kernel_size=3)
    x = torch.zeros(1, 1, 512, 8)
    with pytest.raises(ak.OptionError, match="token_order.*'call', 'tiled'"):
        ak.attend(x, x, x, method="neighborhood", grid=(16, 32), kernel_size=7, token_order="zigzag")
    with pytest.raises(ak.ArgumentError, match="rope=True with token_order='tiled'"):
        ak.nn.Attention(32, 2, method="neighborhood", grid=(16, 32), kernel_size=7, rope=True, token_order="tiled")


def test_a_layer_stack_in_tiled_order_equals_the_row_major_stack():
    """Permute once before two ak.nn layers and once after: the row-major stack's output."""
    grid, opts = (16, 32), dict(grid=(16, 32), kernel_size=7, block_size=16)
    torch.manual_seed(0)
    plain = torch.nn.Sequential(*(ak.nn.Attention(32, 2, method="neighborhood", **opts) for _ in range(2))).double()
    tiled = torch.nn.Sequential(*(ak.nn.Attention(32, 2, method="neighborhood", token_order="tiled", **opts)
                                  for _ in range(2))).double()
    tiled.load_state_dict(plain.state_dict())
    order = ak.token_order("neighborhood", prod(grid), **opts)
    x = torch.randn(2, prod(grid), 32, dtype=torch.float64)
    assert rel_err(tiled(x[:, order.order])[:, order.inverse], plain(x)) <= 1e-12


@pytest.mark.parametrize("method,opts", [
    ("neighborhood", dict(grid=(16, 32), kernel_size=(5, 7), dilation=(1, 2), block_size=16)),
    ("halo", dict(grid=(16, 32), block=4, halo=2, block_size=16)),
    ("divided_space_time", dict(grid=(16, 8, 8), window=4, block_size=32)),
])
def test_every_grid_method_runs_in_tiled_order(method, opts):
    """token_order='tiled' on each method that offers it: the row-major call's output, permuted."""
    L = prod(opts["grid"])
    order = ak.token_order(method, L, **opts)
    q, k, v = (torch.randn(1, 2, L, 8, generator=torch.Generator().manual_seed(i), dtype=torch.float64)
               for i in range(3))
    want = ak.attend(q, k, v, method=method, backend="dense", **opts)
    t = [x[:, :, order.order] for x in (q, k, v)]
    for engine in ("blocksparse", "dense"):
        out = ak.attend(*t, method=method, backend=engine, token_order="tiled", **opts)
        assert rel_err(out[:, :, order.inverse], want) <= 1e-12, engine
