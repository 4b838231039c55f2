"""The flex engine's performance settings (backends/flex_tuning.py): what is accepted, what is refused
and why, and the measured defaults. No kernel runs here (GPU timings: scripts/gpu/bench_patterns.py)."""

from __future__ import annotations

import pytest
import torch

from attnkit.backends.flex import FlexEngine
from attnkit.backends.flex_tuning import (NARROW_FORWARD, TILED_KV_BLOCK, check_kernel_options, check_kv_block,
                                         default_kernel_options, default_kv_block)
from attnkit.errors import OptionError


def test_options_become_a_sorted_key():
    assert check_kernel_options({"num_warps": 4, "BLOCK_M": 64, "fwd_num_stages": 3}) == (
        ("BLOCK_M", 64), ("fwd_num_stages", 3), ("num_warps", 4))
    assert check_kernel_options(None) == ()


@pytest.mark.parametrize("options,match", [
    ({"ROWS_GUARANTEED_SAFE": True}, "NaN"),
    ({"bwd_ROWS_GUARANTEED_SAFE": True}, "NaN"),
    ({"BLOCKS_ARE_CONTIGUOUS": True}, "consecutive blocks"),
    ({"BLOCK_M": 48}, "power of two"),
    ({"num_warps": 0}, "positive int"),
    ({"PRESCALE_QK": 1}, "True or False"),
    ({"BLOCK_MM": 64}, "unknown option 'BLOCK_MM'.*BLOCK_M"),
    ([("BLOCK_M", 64)], "must be a dict"),
])
def test_bad_options_are_refused_with_the_reason(options, match):
    with pytest.raises(OptionError, match=match):
        check_kernel_options(options)


def test_kv_block_and_settings_errors():
    assert check_kv_block(None) is None and check_kv_block(64) == 64
    with pytest.raises(OptionError, match="power of two >= 16"):
        check_kv_block(48)
    engine = FlexEngine()
    with pytest.raises(OptionError, match="unknown setting"):
        engine.configure(block=64)
    with pytest.raises(OptionError, match="token_tiling"):
        engine.configure(token_tiling="no")


def test_tuned_restores_the_settings():
    engine = FlexEngine()
    with engine.tuned(kernel_options={"BLOCK_M": 64}, kv_block=64, token_tiling=False):
        assert engine.kernel_options == {"BLOCK_M": 64} and engine.kv_block == 64 and not engine.token_tiling
    assert engine.kernel_options is None and engine.kv_block is None and engine.token_tiling


def test_narrow_plans_get_64_row_forward_tiles_only_where_measured():
    window_256, neighborhood_2d = 5.0 * 128, 8.25 * 128  # keys per query block (H200 sweep cases)
    assert default_kernel_options("cuda", torch.bfloat16, 128, window_256) == NARROW_FORWARD
    assert all(name.startswith("fwd_") for name in NARROW_FORWARD)  # the backward keeps torch's tiles
    assert default_kernel_options("cuda", torch.bfloat16, 128, neighborhood_2d) == {}
    assert default_kernel_options("cuda", torch.float32, 128, window_256) == {}
    assert default_kernel_options("cuda", torch.bfloat16, 64, window_256) == {}
    assert default_kernel_options("cpu", torch.bfloat16, 128, window_256) == {}


def test_tiled_forward_only_cuda_calls_get_64_key_blocks():
    assert default_kv_block("cuda", 128, tiled=True, needs_grad=False) == TILED_KV_BLOCK == 64
    assert default_kv_block("cuda", 128, tiled=True, needs_grad=True) is None  # sm90 backward tiles: 128
    assert default_kv_block("cuda", 128, tiled=False, needs_grad=False) is None
    assert default_kv_block("cuda", 64, tiled=True, needs_grad=False) is None
    assert default_kv_block("cpu", 128, tiled=True, needs_grad=False) is None
