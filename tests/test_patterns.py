"""Pattern objects: analytic block plans equal the plans of their dense masks; composition;
density; pictures."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import attnkit as ak
from attnkit.patterns import plan_from_dense
from helpers import inputs, rel_err


def windows():
    return st.builds(lambda l, r, c: ak.patterns.sliding_window(left=l, right=r, causal=c),
                     st.integers(0, 80), st.integers(0, 80), st.booleans())


@given(p=windows(), lq=st.integers(1, 150), lk=st.integers(1, 150), bq=st.sampled_from([8, 16, 32]),
       bk=st.sampled_from([8, 16, 32]))
def test_analytic_plan_equals_dense_plan(p, lq, lk, bq, bk):
    analytic = p.block_plan(lq, lk, (bq, bk)).states
    dense = plan_from_dense(p.to_dense(lq, lk), bq, bk).states
    assert torch.equal(analytic, dense)


@given(a=windows(), b=windows(), op=st.sampled_from(["and", "or"]), lq=st.integers(1, 90))
def test_composition(a, b, op, lq):
    p = (a & b) if op == "and" else (a | b)
    want = (a.to_dense(lq, lq) & b.to_dense(lq, lq)) if op == "and" else (a.to_dense(lq, lq) | b.to_dense(lq, lq))
    assert torch.equal(p.to_dense(lq, lq), want)
    plan = p.block_plan(lq, lq, 16).states
    exact = plan_from_dense(want, 16, 16).states
    # composed plans are conservative: never miss a visible tile, never call a partial tile full
    assert torch.all((plan > 0) >= (exact > 0)) and torch.all((plan == 2) <= (exact == 2))
    assert p.density(lq, lq, block=16) == pytest.approx(float(want.float().mean()))


def test_density_and_render():
    p = ak.patterns.sliding_window(9, causal=True)
    assert p.density(100, 100, block=16) == pytest.approx(float(p.to_dense(100, 100).float().mean()))
    text = p.render(30)
    assert "sliding_window" in text and "█" in text and "·" in text


def test_plot_writes_png(tmp_path):
    path = tmp_path / "w.png"
    ak.patterns.sliding_window(left=3, right=2).plot(32, path=path)
    assert path.read_bytes()[:4] == b"\x89PNG"


def test_large_plan_is_cheap():
    plan = ak.patterns.sliding_window(257).block_plan(1 << 20, block=128)
    assert plan.states.shape == (1, 1, 8192, 8192)
    assert plan.counts()["partial"] + plan.counts()["full"] < 8192 * 5


def test_block_size_does_not_change_results():
    q, k, v = inputs(Lq=70, Hkv=4)
    outs = [ak.attend(q, k, v, method="sliding_window", window=11, block_size=b) for b in (16, 32, 128)]
    assert rel_err(outs[0], outs[1]) < 1e-13 and rel_err(outs[0], outs[2]) < 1e-13


def test_blocksparse_picks_a_small_tile_for_a_small_window_and_explains_nothing_changes():
    from attnkit.backends.blocksparse import cheapest_block

    assert cheapest_block(ak.patterns.sliding_window(16, causal=True), 1024, 1024, None) < 128
    assert cheapest_block(ak.patterns.causal(), 1024, 1024, None) == 128
    q, k, v = inputs(Lq=300, Hkv=4)
    auto = ak.attend(q, k, v, is_causal=True, method="sliding_window", window=16)
    fixed = ak.attend(q, k, v, is_causal=True, method="sliding_window", window=16, block_size=128)
    assert rel_err(auto, fixed) < 1e-13
