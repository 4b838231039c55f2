"""Where a pattern's forward time goes inside FlexAttention: the mask rule, the partial-tile path, the tiles.

For each case the flex engine's own block mask (the blocks and token order it picks for a forward-only
call, tokens given in that order) is run three ways with the same compiled FlexAttention and kernel
options:

- ``rule``: the pattern's mask rule on partial tiles (what the engine runs; equals ``ak.attend``);
- ``trivial``: the same tiles, partial ones with a mask that keeps everything (the partial-tile path
  without the rule's arithmetic and table loads; wrong results, a cost probe);
- ``all_full``: every tile computed as a full tile (no masking at all; the kernel's time for the tiles);
- ``arith_const`` / ``arith_tensor`` (tiled neighbourhoods): the same window computed from the token
  index by division, with Python constants resp. 0-d tensors (what the engine's rules may read) — no
  table loads.

``rule - trivial`` is the rule's cost, ``trivial - all_full`` the partial-tile path's, and
``all_full`` against cuDNN dense over the same tile area the kernel's own efficiency.

    PYTHONPATH=src python scripts/gpu/bench_mask_cost.py --out DIR      # one H100/H200
"""

from __future__ import annotations

import argparse
import json
from math import prod
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import BlockMask, flex_attention
from triton.testing import do_bench

import attnkit as ak
from attnkit.backends.flex import FlexEngine
from attnkit.call import AttentionCall

CASES = {
    "window_256": ("sliding_window", {"left": 256, "right": 256}),
    "neighborhood_2d": ("neighborhood", {"grid": (128, 256), "kernel_size": (17, 17), "token_order": "tiled"}),
    "neighborhood_3d": ("neighborhood", {"grid": (8, 64, 64), "kernel_size": (3, 15, 15), "token_order": "tiled"}),
}


def all_full(blocks, nq: int, nk: int):
    """Every tile of the plan (partial and full) as a full tile: (num, idx) over ``nk`` key blocks."""
    keep = torch.zeros(*blocks.kv_num.shape, nk + 1, dtype=torch.bool, device=blocks.kv_num.device)
    for num, idx in ((blocks.kv_num, blocks.kv_idx), (blocks.full_kv_num, blocks.full_kv_idx)):
        live = torch.arange(idx.shape[-1], device=idx.device) < num[..., None]
        keep.scatter_(-1, torch.where(live, idx.long(), nk), True)
    keep = keep[..., :nk]
    num = keep.sum(-1).int()
    idx = torch.sort((~keep).int(), dim=-1, stable=True).indices.int()  # kept blocks first, in order
    return num, idx


def tiled_coords(i, grid, tile, num):
    """Coordinates of position ``i`` of a tiled order with no tail (``grid`` divisible by ``tile``),
    by division: ``num(x)`` turns a size into what the kernel divides by (a constant or a tensor)."""
    D = len(grid)
    volume = 1
    for t in tile:
        volume *= t
    tile_id, r = i // num(volume), i % num(volume)
    out = [None] * D
    for d in reversed(range(D)):
        across = grid[d] // tile[d]
        out[d] = (tile_id % num(across)) * num(tile[d]) + r % num(tile[d])
        tile_id, r = tile_id // num(across), r // num(tile[d])
    return out


def neighborhood_arith(grid, kernel, tile, num):
    """NATTEN's window (stride 1, no dilation, not causal) over a tiled order, by arithmetic."""
    def mask_mod(b, h, qi, ki):
        xq, xk = tiled_coords(qi, grid, tile, num), tiled_coords(ki, grid, tile, num)
        keep = None
        for d in range(len(grid)):
            start = torch.clamp(xq[d] - num(kernel[d] // 2), min=0)
            start = torch.where(start > num(grid[d] - kernel[d]), num(grid[d] - kernel[d]), start)
            seen = (xk[d] >= start) & (xk[d] < start + num(kernel[d]))
            keep = seen if keep is None else keep & seen
        return keep
    return mask_mod


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--L", type=int, default=32768)
    ap.add_argument("--H", type=int, default=16)
    ap.add_argument("--D", type=int, default=128)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, args.H, args.L, args.D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
        dense_ms = do_bench(lambda: F.scaled_dot_product_attention(q, k, v), return_mode="median")
    result = {"card": torch.cuda.get_device_name(), "torch": torch.__version__, "cudnn_dense_fwd_ms": dense_ms,
              "cases": []}
    torch._dynamo.config.recompile_limit = 64  # three mask_mods per case, one compiled flex_attention
    engine = FlexEngine()
    flex = torch.compile(flex_attention, dynamic=False, fullgraph=True)
    for name, (method, options) in CASES.items():
        spec = ak.explain(q, k, v, method=method, backend="flex", **options).plan
        call = AttentionCall.build(q, k, v)
        blocks = engine.blocks(call, spec)
        pattern = engine.layout(call, spec).pattern
        params, _ = engine._device_params(("bench_mask_cost", name), pattern.params(args.L, args.L), q.device)
        kernel_options = dict(engine._kernel_options(call, blocks)) or None
        nq, nk = blocks.kv_idx.shape[-2], blocks.kv_idx.shape[-1]
        size = (blocks.block, blocks.block_k)

        def rule(b, h, qi, ki):  # as the engine's mask_mod (no batch or head rule)
            b, h, qi, ki = b.long(), h.long(), qi.long(), ki.long()
            return pattern.rule(torch.zeros_like(b), torch.zeros_like(h), qi, ki, params)

        def trivial(b, h, qi, ki):
            return qi >= 0

        masks = {"rule": BlockMask.from_kv_blocks(blocks.kv_num, blocks.kv_idx, blocks.full_kv_num, blocks.full_kv_idx,
                                                  BLOCK_SIZE=size, mask_mod=rule, seq_lengths=(args.L, args.L)),
                 "trivial": BlockMask.from_kv_blocks(blocks.kv_num, blocks.kv_idx, blocks.full_kv_num,
                                                     blocks.full_kv_idx, BLOCK_SIZE=size, mask_mod=trivial,
                                                     seq_lengths=(args.L, args.L))}
        if hasattr(pattern, "tile") and not any(n % t for n, t in zip(pattern.base.grid, pattern.tile)):
            base = pattern.base
            shape = (base.grid, base.kernel_size, pattern.tile)
            grid_, kernel_, tile_ = shape
            values = {prod(tile_), *tile_, *kernel_, *(n // t for n, t in zip(grid_, tile_)),
                      *(k_ // 2 for k_ in kernel_), *(n - k_ for n, k_ in zip(grid_, kernel_))}
            scalars = {x: torch.tensor(x, device=q.device) for x in values}  # 0-d tensors, made before tracing

            def as_tensor(x):  # a Python function (dynamo does not trace dict.__getitem__ as a value)
                return scalars[x]

            for label, number in (("arith_const", int), ("arith_tensor", as_tensor)):
                masks[label] = BlockMask.from_kv_blocks(blocks.kv_num, blocks.kv_idx, blocks.full_kv_num,
                                                        blocks.full_kv_idx, BLOCK_SIZE=size,
                                                        mask_mod=neighborhood_arith(*shape, number),
                                                        seq_lengths=(args.L, args.L))
        num, idx = all_full(blocks, nq, nk)
        masks["all_full"] = BlockMask.from_kv_blocks(torch.zeros_like(num), torch.zeros_like(idx), num, idx,
                                                     BLOCK_SIZE=size, mask_mod=trivial, seq_lengths=(args.L, args.L))
        row = {"case": name, "blocks": size, "kernel_options": kernel_options, "tiles": blocks.row_tiles * nq,
               "full_tiles": int(blocks.full_kv_num.sum()), "layout": engine.layout(call, spec).note}
        with torch.no_grad():
            want = ak.attend(q, k, v, method=method, backend="flex", **options)
            row["rule_max_abs_diff_vs_attnkit"] = float((flex(q, k, v, block_mask=masks["rule"],
                                                               kernel_options=kernel_options) - want).abs().max())
            row["attnkit_ms"] = do_bench(lambda: ak.attend(q, k, v, method=method, backend="flex", **options),
                                         return_mode="median")
            for label, mask in masks.items():
                try:
                    got = flex(q, k, v, block_mask=mask, kernel_options=kernel_options)
                except Exception as err:  # noqa: BLE001 - a variant that does not compile is a result
                    lines = [x for x in str(err).splitlines() if x.strip()]
                    row[f"{label}_error"] = f"{type(err).__name__}: {' | '.join(lines[:6])[:600]}"
                    continue
                if label.startswith("arith"):
                    row[f"{label}_max_abs_diff_vs_attnkit"] = float((got - want).abs().max())
                row[f"{label}_ms"] = do_bench(lambda: flex(q, k, v, block_mask=mask, kernel_options=kernel_options),
                                              return_mode="median")
        area = blocks.tile_density  # computed tile area over L x L
        row["all_full_vs_dense_per_area"] = dense_ms * area / row["all_full_ms"]  # 1.0 = cuDNN's speed per tile
        print(json.dumps(row), flush=True)
        result["cases"].append(row)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_mask_cost.json").write_text(json.dumps(result, indent=1, default=str))
    return result


if __name__ == "__main__":
    main()
