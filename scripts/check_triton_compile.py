"""Compile every variant of attnkit's activation-attention Triton kernels for a GPU architecture,
on a machine without a GPU, and report registers, spilled bytes, shared memory (ptxas -v) and
whether every product runs on Hopper's wgmma (``mma.sync`` products are the Ampere path, several
times slower on sm_90).

    PYTHONPATH=src python scripts/check_triton_compile.py [--arch 90] [--dtypes bf16 fp32] [--dims 64 128]
    PYTHONPATH=src python scripts/check_triton_compile.py --candidates     # the benchmark sweep's tiles

Needs Triton (its wheel ships ptxas). The arguments are specialised as a launch of the benchmark
shapes would be (pointers and multiples of 16 marked 16-divisible, GQA group 1 a constant), so
vectorised loads and pipelining match the GPU build. Exit code 1 if a variant fails to compile,
spills more than ``--max-spill`` bytes or (16-bit inputs on sm_90+) has a non-wgmma product. The
tile table is :data:`attnkit.backends.triton.activation.TILES`; ``--candidates`` checks
``CANDIDATE_TILES`` instead (bf16, sigmoid and softplus).
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from attnkit.backends.triton import activation_bwd_kernels as KB  # noqa: E402
from attnkit.backends.triton import activation_kernels as KF  # noqa: E402
from attnkit.backends.triton.activation import CANDIDATE_TILES, blocks_for  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
FLOAT_ARGS = ("hs", "hb", "power", "out_scale")
ROW_ARGS = ("DEN", "C", "INVZ", "THR", "RW", "RA", "RB", "E")
TENSOR_ARGS = ("Q", "K", "V", "O", "DO", "DQ", "DK", "DV")
KERNELS = {"fwd": KF._fwd_kernel, "dq": KB._bwd_q_kernel, "dkv": KB._bwd_kv_kernel}


def ptxas_report(kernel) -> tuple[int, int]:
    ptx = kernel.asm["ptx"]
    arch = re.search(r"\.target (sm_\w+)", ptx).group(1)
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        text = subprocess.run([ptxas, "-v", f"--gpu-name={arch}", path, "-o", path + ".o"],
                              capture_output=True, text=True).stderr
    regs = re.search(r"Used (\d+) registers", text)
    spill = re.search(r"(\d+) bytes spill stores", text)
    return int(regs.group(1)) if regs else -1, int(spill.group(1)) if spill else -1


def compile_variant(kind, blk, head_dim, dtype, flags, target):
    fn = KERNELS[kind]
    signature, constants, attrs = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in ROW_ARGS:
            signature[name] = "*fp32"
        elif name in TENSOR_ARGS:
            signature[name] = f"*{dtype}"
        elif name in FLOAT_ARGS:
            signature[name] = "fp32"
        elif name == "GROUP":
            signature[name], constants[name] = "constexpr", 1
            continue
        elif name.isupper() and name != "H":
            signature[name] = "constexpr"
            continue
        else:
            signature[name] = "i32"
        if signature[name] != "fp32":  # 16-aligned pointers; strides, H, L: multiples of 16
            attrs[(i,)] = [["tt.divisibility", 16]]
    half = dtype != "fp32"
    constants.update(flags, HEAD_DIM=head_dim, BLOCK_M=blk.m, BLOCK_N=blk.n, UPCAST=False,
                     PREC="tf32" if half else "ieee", POLY=half, FAST=half, EVEN_M=True)
    constants = {k: v for k, v in constants.items() if k in fn.arg_names}
    kernel = triton.compile(ASTSource(fn, signature, constants, attrs), target=target,
                            options=dict(num_warps=blk.warps, num_stages=blk.stages))
    ptx = kernel.asm["ptx"]
    return ptxas_report(kernel) + (kernel.metadata.shared, ptx.count("wgmma.mma_async"),
                                   len(re.findall(r"\bmma\.sync", ptx)))


def variants(modes=(0, 1, 2, 3)):
    """(label, kernel kind, constexpr flags); mode 2 with an integer and a general power."""
    for mode, causal in itertools.product(modes, (False, True)):
        for ipow in ((2, 0) if mode == 2 else (2,) if mode == 3 else (1,)):
            base = dict(MODE=mode, CAUSAL=causal, IPOW=ipow)
            yield "fwd", "fwd", dict(base, ROWSUM_ONLY=False)
            yield "dq", "dq", dict(base, ROWTERM=False)
            yield "dkv", "dkv", base
            if mode == 3:
                yield "rowsum", "fwd", dict(base, ROWSUM_ONLY=True)
                yield "rowterm", "dq", dict(base, ROWTERM=True)


def check(kind, blk, dtype, head_dim, label, flags, target, max_spill) -> bool:
    name = f"{dtype} D={head_dim} {label:7s} " + " ".join(f"{k}={v}" for k, v in flags.items())
    try:
        regs, spill, smem, wgmma, mma_sync = compile_variant(kind, blk, head_dim, dtype, flags, target)
    except Exception as err:  # report every failing variant, not only the first
        print(f"{name}: FAILED {type(err).__name__}: {str(err)[:300]}", flush=True)
        return False
    slow_mma = mma_sync > 0 and dtype != "fp32" and target.arch >= 90
    bad = spill > max_spill or slow_mma
    print(f"{name}: tile {blk.m}x{blk.n} warps {blk.warps} stages {blk.stages}: regs {regs}, "
          f"spill {spill} B, smem {smem} B, wgmma {wgmma}, mma.sync {mma_sync}"
          + ("  <- spills" if spill > max_spill else "") + ("  <- not wgmma" if slow_mma else ""),
          flush=True)
    return not bad


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90 for H100 / H200")
    ap.add_argument("--dtypes", nargs="+", default=["bf16"], choices=sorted(DTYPES))
    ap.add_argument("--dims", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--max-spill", type=int, default=0)
    ap.add_argument("--candidates", action="store_true",
                    help="check CANDIDATE_TILES (bf16, modes 0 and 1) instead of the default table")
    args = ap.parse_args(argv)
    target = GPUTarget("cuda", args.arch, 32)
    bad = 0
    if args.candidates:
        for head_dim in args.dims:
            for label, kind, flags in variants(modes=(0, 1)):
                for blk in CANDIDATE_TILES[kind]:
                    bad += not check(kind, blk, "bf16", head_dim, label, flags, target, args.max_spill)
    else:
        for dtype in args.dtypes:
            for head_dim in args.dims:
                for label, kind, flags in variants():
                    blk = blocks_for(kind, head_dim, DTYPES[dtype])
                    bad += not check(kind, blk, dtype, head_dim, label, flags, target, args.max_spill)
    print(f"{bad} variant(s) failed, spilled or missed wgmma" if bad else
          "all variants compile without spills, every 16-bit product on wgmma")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
