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


def test_forward_tiles_never_exceed_the_blocks():
    # FlexAttention's sm90 heuristic at head dim 64 in bf16 is 128 x 128 tiles: a 64-key block (the
    # tiled grid default) must get 64-key tiles, or FlexAttention refuses to compile
    wide = 8.25 * 128
    assert default_kernel_options("cuda", torch.bfloat16, 64, wide, (128, 64)) == {"fwd_BLOCK_N": 64}
    assert default_kernel_options("cuda", torch.bfloat16, 128, wide, (64, 64)) == {"fwd_BLOCK_M": 64, "fwd_BLOCK_N": 64}
    assert default_kernel_options("cuda", torch.float32, 128, wide, (32, 16)) == {"fwd_BLOCK_M": 32, "fwd_BLOCK_N": 16}
    narrow = default_kernel_options("cuda", torch.bfloat16, 128, 5.0 * 128, (32, 32))
    assert narrow == {**NARROW_FORWARD, "fwd_BLOCK_M": 32, "fwd_BLOCK_N": 32}
    assert default_kernel_options("cuda", torch.bfloat16, 128, wide, (256, 128)) == {}
    assert default_kernel_options("cpu", torch.bfloat16, 64, wide, (64, 64)) == {}


def test_small_cuda_blocks_are_forward_only(monkeypatch):
    from types import SimpleNamespace

    import torch.utils._triton as triton_utils

    import attnkit.backends.flex as flex_module

    monkeypatch.setattr(flex_module, "flex_unavailable", lambda: None)  # as on a CUDA machine
    monkeypatch.setattr(triton_utils, "has_triton", lambda: True)
    engine = flex_module.FlexEngine()
    for block, grad, expected in ((48, False, "multiple of 128"), (64, True, "backward pass needs query blocks")):
        spec = SimpleNamespace(block=block, pattern=None, mod_tensors=())
        call = SimpleNamespace(device=torch.device("cuda"), head_dim=64, value_dim=64, dtype=torch.bfloat16,
                               query=torch.zeros(1, requires_grad=grad), key=torch.zeros(1), value=torch.zeros(1),
                               attn_mask=None, dropout_p=0.0, q_len=64, k_len=64)
        assert expected in engine.can_run(call, spec)


def test_narrow_forward_only_plans_get_64_token_blocks_only_where_measured():
    from attnkit.backends.flex_tuning import NARROW_BLOCK, default_blocks

    window_256, neighborhood_3d = 5.0 * 128, 26.5 * 64  # keys per query block at the default blocks
    assert default_blocks("cuda", torch.bfloat16, 128, False, window_256) == (NARROW_BLOCK, NARROW_BLOCK) == (64, 64)
    assert default_blocks("cuda", torch.bfloat16, 128, False, neighborhood_3d) is None
    assert default_blocks("cuda", torch.bfloat16, 128, True, window_256) is None  # training keeps 128
    assert default_blocks("cuda", torch.float32, 128, False, window_256) is None
    assert default_blocks("cuda", torch.bfloat16, 64, False, window_256) is None
    assert default_blocks("cpu", torch.bfloat16, 128, False, window_256) is None
