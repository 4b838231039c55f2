"""Ways to move (B, H, L, D) tokens into a grid's tiled order, timed forward and backward.

The flex engine runs grid patterns in a tiled token order (attnkit.backends.reorder); each call
moves q, k, v in and the output out, and the backward moves the four gradients. On an H200 a
generic ``index_select`` along L cost 0.21 ms per (1, 16, 32768, 128) bf16 tensor (128 MiB) and a
7-d permute copy 0.19 ms,
about 0.7 ms of a 1.9 ms 2-D neighbourhood call (scripts/gpu/profile_call.py). Candidates:

- ``gather``: ``x.index_select(-2, order)`` (attnkit's move before 2026-11-27);
- ``permute``: reshape to (..., n0/t0, t0, n1/t1, t1, ..., D), permute, reshape (one strided copy);
- ``rows``: the order moves whole runs of ``t_last * D`` contiguous values, so gather those rows
  with ``index_select`` along dim 0 of a 2-D view (one index per run, not per value; the engine's
  move now, ``Layout.into_order``);
- ``rows_dim1``: the same along dim 1 of a ``(B H, L / t_last, t_last D)`` view (an index per run,
  not per batch and head);
- ``compiled``: ``permute`` under ``torch.compile`` (Inductor's generated copy kernel).

Each is checked equal to ``gather`` first. Median ms (triton.testing.do_bench) of the move of one
tensor, and of move + backward.

    PYTHONPATH=src python scripts/gpu/bench_token_moves.py --out DIR
    PYTHONPATH=src python scripts/gpu/bench_token_moves.py --device cpu --tiny --out /tmp/moves   # smoke
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from math import prod
from pathlib import Path

import torch

from attnkit.backends.reorder import Layout, run_length
from attnkit.patterns.grid_order import tiled_order


class _Gather(torch.autograd.Function):
    """``x.index_select(dim, index)``; backward: the gather by ``inverse`` (a permutation)."""

    @staticmethod
    def forward(ctx, x, index, inverse, dim):
        ctx.save_for_backward(inverse)
        ctx.dim = dim
        return x.index_select(dim, index)

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        return grad.index_select(ctx.dim, inverse), None, None, None


def tile_transpose(x, grid, tile):
    """The tiled order as a reshape + permute of the token axis (no tail)."""
    lead, rank = x.dim() - 2, len(grid)
    whole = [n // t for n, t in zip(grid, tile)]
    y = x.reshape(*x.shape[:lead], *[m for w, t in zip(whole, tile) for m in (w, t)], x.shape[-1])
    perm = [lead + 2 * d for d in range(rank)] + [lead + 2 * d + 1 for d in range(rank)]
    return y.permute(*range(lead), *perm, y.dim() - 1).reshape(x.shape)


def candidates(grid, tile, shape, device):
    B, H, L, D = shape
    order = tiled_order(grid, tile)
    run = run_length(order)
    starts = (order[::run] // run).to(device)
    layout = Layout(None, "", run, starts)  # the engine's move (attnkit.backends.reorder)
    order = order.to(device)
    inverse, inverse_starts = torch.argsort(order), torch.argsort(starts)

    def gather(x):
        return _Gather.apply(x, order, inverse, 2)

    def permute(x):
        return tile_transpose(x, grid, tile)

    def by_rows_dim1(x):
        return _Gather.apply(x.reshape(B * H, -1, run * D), starts, inverse_starts, 1).view(x.shape)

    out = {"gather": gather, "permute": permute, "rows": layout.into_order, "rows_dim1": by_rows_dim1}
    if device == "cuda":
        out["compiled"] = torch.compile(permute, dynamic=False, fullgraph=True)
    return out


def bench(fn, device, reps=20) -> float:
    if device == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=10, rep=50, return_mode="median"))
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tiny", action="store_true")
    args = ap.parse_args(argv)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    cases = ({"2d": ((16, 32), (4, 8)), "3d": ((4, 8, 8), (2, 4, 4))} if args.tiny else
             {"2d": ((128, 256), (16, 8)), "3d": ((8, 64, 64), (2, 8, 8))})
    H, D = (2, 16) if args.tiny else (16, 128)
    result = {"card": torch.cuda.get_device_name() if args.device == "cuda" else "cpu", "torch": torch.__version__,
              "shape": {"B": 1, "H": H, "D": D, "dtype": str(dtype)}, "rows": []}
    print(result["card"], result["torch"])
    for name, (grid, tile) in cases.items():
        shape = (1, H, prod(grid), D)
        x = torch.randn(shape, device=args.device, dtype=dtype, requires_grad=True)
        g = torch.randn(shape, device=args.device, dtype=dtype)
        want = x.detach().index_select(-2, tiled_order(grid, tile).to(args.device))
        for label, fn in candidates(grid, tile, shape, args.device).items():
            row = {"case": name, "grid": grid, "tile": tile, "how": label}
            try:
                row["equal"] = bool(torch.equal(fn(x).detach(), want))
                row["move_ms"] = bench(lambda: fn(x), args.device)
                row["move_bwd_ms"] = bench(lambda: torch.autograd.grad(fn(x), x, g), args.device)
            except Exception as err:  # noqa: BLE001 - a candidate that fails is a result
                row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
            print(json.dumps(row), flush=True)
            result["rows"].append(row)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_token_moves.json").write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
