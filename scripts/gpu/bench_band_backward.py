"""Experiment: can a banded backward of our own beat FlexAttention's on a sliding window?

FlexAttention's backward (like Triton's fused-attention tutorial) runs two loops per tile pair: dK/dV
over query blocks and dQ over key blocks, recomputing the scores in each (seven GEMMs per tile).
FlashAttention-2's first backward (Dao 2023, arXiv:2307.08691, Alg. 2) makes one pass over key
blocks and accumulates dQ with atomic adds in float32: five GEMMs per tile, plus the atomics. This
script times that one-pass form, written here in Triton for a 1-D band (query i sees keys
[i - left, i + right]), torch's FlashAttention-2 kernels with a local window (private aten ops) and,
where the cuDNN frontend is installed (``pip install nvidia-cudnn-frontend``, its pygraph API only),
cuDNN's SDPA with a diagonal band, against FlexAttention on the same window and cuDNN dense attention,
and checks their outputs and gradients against FlexAttention's first.

    PYTHONPATH=src python scripts/gpu/bench_band_backward.py --out DIR      # one H100/H200

Not a library engine: a measurement (docs/results/README.md, issue #4).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
import triton
import triton.language as tl
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import create_block_mask, flex_attention
from triton.testing import do_bench

LOG2E = 1.4426950408889634


@triton.jit
def _band_backward(Q, K, V, DO, LSE, DELTA, DQ, DK, DV, sm_scale, L, LEFT, RIGHT,
                   stride_b, stride_h, stride_l, H: tl.constexpr, D: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One key block of one (batch, head): dK, dV in registers, dQ added atomically (float32)."""
    start_n = tl.program_id(0) * BLOCK_N
    bh = tl.program_id(1)
    base = (bh // H) * stride_b + (bh % H) * stride_h
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    kv_ptrs = base + offs_n[:, None] * stride_l + offs_d[None, :]
    k = tl.load(K + kv_ptrs, mask=offs_n[:, None] < L, other=0.0)
    v = tl.load(V + kv_ptrs, mask=offs_n[:, None] < L, other=0.0)
    dk = tl.zeros([BLOCK_N, D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, D], dtype=tl.float32)
    qk_scale = sm_scale * 1.4426950408889634
    lo = tl.maximum(start_n - RIGHT, 0) // BLOCK_M * BLOCK_M
    hi = tl.minimum(start_n + BLOCK_N + LEFT, L)
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        row_ok = offs_m < L
        q_ptrs = base + offs_m[:, None] * stride_l + offs_d[None, :]
        q = tl.load(Q + q_ptrs, mask=row_ok[:, None], other=0.0)
        do = tl.load(DO + q_ptrs, mask=row_ok[:, None], other=0.0)
        lse = tl.load(LSE + bh * L + offs_m, mask=row_ok, other=0.0)
        delta = tl.load(DELTA + bh * L + offs_m, mask=row_ok, other=0.0)
        s_t = tl.dot(k, tl.trans(q))  # (keys, queries)
        p_t = tl.math.exp2(s_t * qk_scale - lse[None, :] * 1.4426950408889634)
        seen = ((offs_n[:, None] >= offs_m[None, :] - LEFT) & (offs_n[:, None] <= offs_m[None, :] + RIGHT)
                & row_ok[None, :])
        p_t = tl.where(seen, p_t, 0.0)
        dv += tl.dot(p_t.to(do.dtype), do)
        dp_t = tl.dot(v, tl.trans(do))
        ds_t = (p_t * (dp_t - delta[None, :])).to(q.dtype)
        dk += tl.dot(ds_t, q)
        dq = tl.dot(tl.trans(ds_t), k) * sm_scale
        tl.atomic_add(DQ + q_ptrs, dq, mask=row_ok[:, None], sem="relaxed")
    tl.store(DK + kv_ptrs, (dk * sm_scale).to(k.dtype), mask=offs_n[:, None] < L)
    tl.store(DV + kv_ptrs, dv.to(v.dtype), mask=offs_n[:, None] < L)


def band_backward(q, k, v, out, dout, lse, left, right, block_m=64, block_n=128, warps=8, stages=2):
    """dq, dk, dv of softmax attention over the band; ``lse`` natural-log (B, H, L) float32."""
    B, H, L, D = q.shape
    delta = (out.float() * dout.float()).sum(-1)
    dq = torch.zeros(q.shape, device=q.device, dtype=torch.float32)
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    grid = (triton.cdiv(L, block_n), B * H)
    _band_backward[grid](q, k, v, dout, lse, delta, dq, dk, dv, 1.0 / math.sqrt(D), L, left, right,
                         q.stride(0), q.stride(1), q.stride(2), H=H, D=D, BLOCK_M=block_m, BLOCK_N=block_n,
                         num_warps=warps, num_stages=stages)
    return dq.to(q.dtype), dk, dv


def _rel(got, want) -> float:
    return float((got.float() - want.float()).abs().max() / want.float().abs().max())


def cudnn_band(q, k, v, dout, out_ref, grads_ref, w) -> dict:
    """cuDNN SDPA forward and backward graphs with a diagonal band (cuDNN's left bound counts the
    query itself: ``w + 1`` for ``w`` keys back), timed apart; needs the ``cudnn`` frontend package."""
    row = {"kernel": "cudnn_band"}
    try:
        import cudnn
    except ImportError as err:
        return {**row, "error": f"cudnn frontend not installed ({err})"}
    row["frontend"], row["backend"] = cudnn.__version__, cudnn.backend_version()
    handle = cudnn.create_handle()
    band = {"diagonal_alignment": cudnn.diagonal_alignment.TOP_LEFT, "diagonal_band_left_bound": w + 1,
            "diagonal_band_right_bound": w, "attn_scale": 1.0 / math.sqrt(q.shape[-1])}

    def graph():
        return cudnn.pygraph(io_data_type=cudnn.data_type.BFLOAT16, intermediate_data_type=cudnn.data_type.FLOAT,
                             compute_data_type=cudnn.data_type.FLOAT, handle=handle)

    def build(g):
        g.validate()
        g.build_operation_graph()
        g.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
        g.check_support()
        g.build_plans()
        return torch.empty(g.get_workspace_size(), device=q.device, dtype=torch.uint8)

    try:
        fwd = graph()
        tq, tk, tv = (fwd.tensor_like(t) for t in (q, k, v))
        o, stats = fwd.sdpa(name="sdpa", q=tq, k=tk, v=tv, generate_stats=True, **band)
        o.set_output(True).set_dim(list(q.shape)).set_stride(list(q.stride()))
        stats.set_output(True).set_data_type(cudnn.data_type.FLOAT)
        out, lse = torch.empty_like(q), torch.empty(*q.shape[:-1], 1, device=q.device, dtype=torch.float32)
        ws = build(fwd)
        forward = lambda: fwd.execute({tq: q, tk: k, tv: v, o: out, stats: lse}, ws, handle=handle)  # noqa: E731
        forward()
        row["fwd_max_rel_err"] = _rel(out, out_ref)
        row["fwd_ms"] = do_bench(forward, return_mode="median")
        bwd = graph()
        bq, bk, bv, bo, bdo, bst = (bwd.tensor_like(t) for t in (q, k, v, out, dout, lse))
        dq_, dk_, dv_ = bwd.sdpa_backward(name="sdpa_backward", q=bq, k=bk, v=bv, o=bo, dO=bdo, stats=bst, **band)
        for t in (dq_, dk_, dv_):
            t.set_output(True).set_dim(list(q.shape)).set_stride(list(q.stride()))
        grads = [torch.empty_like(q) for _ in range(3)]
        wsb = build(bwd)
        backward = lambda: bwd.execute({bq: q, bk: k, bv: v, bo: out, bdo: dout, bst: lse,  # noqa: E731
                                        dq_: grads[0], dk_: grads[1], dv_: grads[2]}, wsb, handle=handle)
        backward()
        row["max_rel_err"] = [_rel(g, t) for g, t in zip(grads, grads_ref)]
        row["bwd_ms"] = do_bench(backward, return_mode="median")
        row["fwdbwd_ms"] = row["fwd_ms"] + row["bwd_ms"]
    except Exception as err:  # noqa: BLE001 - an unsupported graph is a result
        row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''}"
    return row


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--L", type=int, default=32768)
    ap.add_argument("--H", type=int, default=16)
    ap.add_argument("--D", type=int, default=128)
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    shape = (1, args.H, args.L, args.D)
    q, k, v, dout = (torch.randn(shape, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    w = args.window
    mask = create_block_mask(lambda b, h, i, j: (j >= i - w) & (j <= i + w), None, None, args.L, args.L, device="cuda")
    flex = torch.compile(flex_attention, dynamic=False)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]

    def flex_fwd_bwd():
        return torch.autograd.grad(flex(*leaves, block_mask=mask), leaves, dout)

    with torch.no_grad():
        out, lse = flex(q, k, v, block_mask=mask, return_lse=True)
    want = flex_fwd_bwd()
    result = {"card": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
              "shape": shape, "window": w, "rows": []}
    result["flex_fwd_ms"] = do_bench(lambda: flex(q, k, v, block_mask=mask), return_mode="median")
    result["flex_fwdbwd_ms"] = do_bench(flex_fwd_bwd, return_mode="median")
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
        result["cudnn_dense_fwd_ms"] = do_bench(lambda: F.scaled_dot_product_attention(q, k, v), return_mode="median")
        result["cudnn_dense_fwdbwd_ms"] = do_bench(
            lambda: torch.autograd.grad(F.scaled_dot_product_attention(*leaves), leaves, dout), return_mode="median")
    print(json.dumps({k_: v_ for k_, v_ in result.items() if k_ != "rows"}), flush=True)
    # torch's FlashAttention-2 kernels take a local window (window_size_left / _right, private aten ops;
    # layout (B, L, H, D)); autograd runs their windowed backward
    def fa2_local(q, k, v):
        qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
        out = torch.ops.aten._flash_attention_forward(qt, kt, vt, None, None, args.L, args.L, 0.0, False, False,
                                                      window_size_left=w, window_size_right=w)[0]
        return out.transpose(1, 2)

    row = {"kernel": "fa2_local"}
    try:
        with torch.no_grad():
            row["fwd_max_rel_err"] = _rel(fa2_local(q, k, v), out)
        got = torch.autograd.grad(fa2_local(*leaves), leaves, dout)
        row["max_rel_err"] = [_rel(g, t) for g, t in zip(got, want)]
        row["fwd_ms"] = do_bench(lambda: fa2_local(q, k, v), return_mode="median")
        row["fwdbwd_ms"] = do_bench(lambda: torch.autograd.grad(fa2_local(*leaves), leaves, dout), return_mode="median")
    except Exception as err:  # noqa: BLE001
        row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''}"
    print(json.dumps(row), flush=True)
    result["rows"].append(row)
    result["rows"].append(cudnn_band(q, k, v, dout, out, want, w))
    print(json.dumps(result["rows"][-1]), flush=True)
    # the best of a first sweep on the H200 (64x128 with 4 warps 4.75 ms, 32x128 5.86, 128x64 3.31,
    # 128x128 out of shared memory)
    for bm, bn, warps, stages in ((64, 128, 8, 2), (64, 128, 8, 3), (64, 64, 4, 2)):
        row = {"block_m": bm, "block_n": bn, "warps": warps, "stages": stages}
        try:
            got = band_backward(q, k, v, out, dout, lse, w, w, bm, bn, warps, stages)
            row["max_rel_err"] = [_rel(g, t) for g, t in zip(got, want)]
            row["bwd_ms"] = do_bench(lambda: band_backward(q, k, v, out, dout, lse, w, w, bm, bn, warps, stages),
                                     return_mode="median")
            row["fwd_plus_ours_ms"] = result["flex_fwd_ms"] + row["bwd_ms"]
        except Exception as err:  # noqa: BLE001 - a config that does not compile is a result
            row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
        print(json.dumps(row), flush=True)
        result["rows"].append(row)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_band_backward.json").write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
