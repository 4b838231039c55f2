"""Compile every variant of attnkit's activation-attention Triton kernels for a GPU architecture,
on a machine without a GPU, and report registers, spilled bytes and shared memory (ptxas -v).

    PYTHONPATH=src python scripts/check_triton_compile.py [--arch 90] [--dtypes bf16 fp32] [--dims 64 128]

Needs Triton (its wheel ships ptxas). Exit code 1 if a variant fails to compile or spills more than
``--max-spill`` bytes. The tile table is :func:`attnkit.backends.triton.activation.blocks_for`.
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

from attnkit.backends.triton import activation_kernels as K  # noqa: E402
from attnkit.backends.triton.activation import blocks_for  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
FLOAT_ARGS = ("scale", "bias", "length_scale", "power", "threshold")
ROW_ARGS = ("DEN", "ZROW", "INVD", "SHIFT", "EROW")
TENSOR_ARGS = ("Q", "K", "V", "O", "DO", "DQ", "DK", "DV")


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


def compile_variant(fn, kind, head_dim, dtype, flags, target):
    blk = blocks_for(kind, head_dim, DTYPES[dtype], flags.get("ACT", 0))
    signature = {}
    for name in fn.arg_names:
        if name in ROW_ARGS:
            signature[name] = "*fp32"
        elif name in TENSOR_ARGS:
            signature[name] = f"*{dtype}"
        elif name in FLOAT_ARGS:
            signature[name] = "fp32"
        elif name.isupper() and name not in ("H", "GROUP"):
            signature[name] = "constexpr"
        else:
            signature[name] = "i32"
    constants = dict(flags, HEAD_DIM=head_dim, BLOCK_M=blk.m, BLOCK_N=blk.n, UPCAST=False,
                     PREC="ieee" if dtype == "fp32" else "tf32", FAST=dtype != "fp32")
    constants = {k: v for k, v in constants.items() if k in fn.arg_names}
    kernel = triton.compile(ASTSource(fn, signature, constants), target=target,
                            options=dict(num_warps=blk.warps, num_stages=blk.stages))
    return ptxas_report(kernel) + (kernel.metadata.shared, blk)


def variants():
    for act, causal, sharpen in itertools.product((0, 1), (False, True), (False, True)):
        if act == 0 and sharpen:
            continue
        base = dict(ACT=act, CAUSAL=causal, SHARPEN=sharpen)
        yield "fwd", K._fwd_kernel, "fwd", dict(base, NORM_SUM=act == 1, ROWSUM_ONLY=False)
        yield "dq", K._bwd_q_kernel, "dq", dict(base, ROWTERM=False)
        yield "dkv", K._bwd_kv_kernel, "dkv", base
        if sharpen:
            yield "rowsum", K._fwd_kernel, "fwd", dict(base, NORM_SUM=True, ROWSUM_ONLY=True)
            yield "rowterm", K._bwd_q_kernel, "dq", dict(base, ROWTERM=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90 for H100 / H200")
    ap.add_argument("--dtypes", nargs="+", default=["bf16"], choices=sorted(DTYPES))
    ap.add_argument("--dims", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--max-spill", type=int, default=0)
    args = ap.parse_args(argv)
    target = GPUTarget("cuda", args.arch, 32)
    bad = 0
    for dtype in args.dtypes:
        for head_dim in args.dims:
            for label, fn, kind, flags in variants():
                name = f"{dtype} D={head_dim} {label:7s} " + " ".join(f"{k}={v}" for k, v in flags.items())
                try:
                    regs, spill, smem, blk = compile_variant(fn, kind, head_dim, dtype, flags, target)
                except Exception as err:  # report every failing variant, not only the first
                    print(f"{name}: FAILED {type(err).__name__}: {str(err)[:300]}", flush=True)
                    bad += 1
                    continue
                over = spill > args.max_spill
                bad += over
                print(f"{name}: tile {blk.m}x{blk.n} warps {blk.warps}: regs {regs}, spill {spill} B, "
                      f"smem {smem} B{'  <- spills' if over else ''}", flush=True)
    print(f"{bad} variant(s) failed or spilled" if bad else "all variants compile without spills")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
