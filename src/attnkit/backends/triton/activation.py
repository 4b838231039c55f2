"""The ``triton`` backend of activation attention: launches the kernels of
:mod:`.activation_kernels` (imported here on first use) inside an autograd Function.

Shapes: q ``(B, H, Lq, D)``, k / v ``(B, Hkv, Lk, D)`` (GQA read in place: query head h uses kv head
``h // (H // Hkv)``), D = Dv in {16, 32, 64, 128}; float16 / bfloat16 / float32 inputs (float32
products in IEEE precision, not TF32). Forward: one kernel (two with re-weighting: the row sums Z
first). Backward: delta = dO . out in torch, then a dq kernel and a dk/dv kernel (plus a row-term
kernel for the re-weighting); dk / dv are per query head and summed over each GQA group.
``normalize="count"`` / ``"sqrt_count"`` divide the kernel's output outside the kernels.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..activation import ActivationSpec, qk_layer_norm, row_counts_dense
from . import ACTIVATIONS, fix_interpreter_scalars, interpreting


@dataclass(frozen=True)
class KernelArgs:
    """The numbers and switches every kernel takes."""

    act: int
    causal: bool
    norm_sum: bool
    sharpen: bool
    scale: float
    bias: float = 0.0
    length_scale: float = 0.0
    power: float = 1.0
    threshold: float = 0.0


@dataclass(frozen=True)
class Blocks:
    """Tile sizes and launch settings of one kernel."""

    m: int
    n: int
    warps: int
    stages: int


def blocks_for(kind: str, head_dim: int, dtype: torch.dtype, act: int = 0) -> Blocks:
    """Tile sizes (queries x keys), 8 warps, 3 stages: chosen so that no kernel variant spills
    registers when compiled for sm_90 with Triton 3.6 (ptxas -v over every variant; softplus's
    extra transcendentals need the narrower forward tile at D = 128). Float32 inputs use half the
    tiles (twice the shared memory per element)."""
    wide = head_dim > 64
    table = {"fwd": Blocks(128, 32 if (wide and act == 1) else 64, 8, 3),
             "dq": Blocks(64, 32 if wide else 64, 8, 3),
             "dkv": Blocks(64, 32, 8, 3) if wide else Blocks(32, 128, 8, 3)}
    b = table[kind]
    if dtype == torch.float32:
        b = Blocks(max(16, b.m // 2), max(16, b.n // 2), b.warps, 2)
    return b


def kernel_args(call, spec: ActivationSpec) -> KernelArgs:
    act = spec.activation
    sharpen = spec.sharpen is not None
    power, threshold = spec.sharpen if sharpen else (1.0, 0.0)
    return KernelArgs(ACTIVATIONS[type(act)], call.is_causal, spec.normalize == "sum", sharpen,
                      call.scale, getattr(act, "bias", 0.0), getattr(act, "length_scale", 0.0),
                      power, threshold)


def _launch_common(a: KernelArgs, H: int, group: int, Lq: int, Lk: int):
    return (H, group, Lq, Lk, a.scale, a.bias, a.length_scale, a.power, a.threshold)


def _precision(dtype: torch.dtype) -> dict:
    """Kernel settings by dtype: IEEE float32 products for float32 inputs (not TF32); the fast
    tanh.approx sigmoid for half-precision inputs on a GPU; under the CPU interpreter bfloat16 dot
    operands are upcast (its bfloat16 dot is wrong, triton-lang/triton#11584)."""
    return dict(PREC="ieee" if dtype == torch.float32 else "tf32",
                UPCAST=interpreting() and dtype == torch.bfloat16,
                FAST=not interpreting() and dtype != torch.float32)


def forward(q, k, v, a: KernelArgs):
    """Returns out ``(B, H, Lq, D)``, the row sums of the final weights and (re-weighting) Z."""
    from .activation_kernels import _fwd_kernel

    fix_interpreter_scalars()
    B, H, Lq, D = q.shape
    Lk, group = k.shape[2], H // k.shape[1]
    out = torch.empty_like(q)
    den = torch.empty(B, H, Lq, dtype=torch.float32, device=q.device)
    z = torch.empty_like(den) if a.sharpen else den
    blk = blocks_for("fwd", D, q.dtype, a.act)
    grid = (triton_cdiv(Lq, blk.m), B * H)
    common = (q, k, v, out)
    strides = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3])
    flags = dict(ACT=a.act, CAUSAL=a.causal, NORM_SUM=a.norm_sum, SHARPEN=a.sharpen, HEAD_DIM=D,
                 BLOCK_M=blk.m, BLOCK_N=blk.n, **_precision(q.dtype), num_warps=blk.warps,
                 num_stages=blk.stages)
    if a.sharpen:
        _fwd_kernel[grid](*common, z, z, *strides, *_launch_common(a, H, group, Lq, Lk),
                          ROWSUM_ONLY=True, **flags)
    _fwd_kernel[grid](*common, den, z, *strides, *_launch_common(a, H, group, Lq, Lk),
                      ROWSUM_ONLY=False, **flags)
    return out, den, (z if a.sharpen else None)


def backward(q, k, v, out, den, z, dout, a: KernelArgs):
    from .activation_kernels import _bwd_kv_kernel, _bwd_q_kernel

    fix_interpreter_scalars()
    B, H, Lq, D = q.shape
    Hk, Lk = k.shape[1], k.shape[2]
    group = H // Hk
    if a.norm_sum:
        invd = torch.where(den > 0, 1 / torch.where(den > 0, den, torch.ones_like(den)), torch.zeros_like(den))
        shift = (dout.float() * out.float()).sum(-1) * invd
    else:
        invd = torch.ones_like(den)
        shift = torch.zeros_like(den)
    zrow = z if z is not None else den
    erow = torch.zeros_like(den)
    common = _launch_common(a, H, group, Lq, Lk)
    strides = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3])
    prec = _precision(q.dtype)
    bq = blocks_for("dq", D, q.dtype, a.act)
    grid_q = (triton_cdiv(Lq, bq.m), B * H)
    dq = torch.empty_like(q)
    flags = dict(ACT=a.act, CAUSAL=a.causal, SHARPEN=a.sharpen, HEAD_DIM=D, BLOCK_M=bq.m,
                 BLOCK_N=bq.n, **prec, num_warps=bq.warps, num_stages=bq.stages)
    if a.sharpen:
        _bwd_q_kernel[grid_q](q, k, v, dout, dq, invd, shift, zrow, erow, *strides, *common,
                              ROWTERM=True, **flags)
    _bwd_q_kernel[grid_q](q, k, v, dout, dq, invd, shift, zrow, erow, *strides, *common,
                          ROWTERM=False, **flags)
    gdtype = k.dtype if group == 1 else torch.float32
    dk = torch.empty(B, H, Lk, D, dtype=gdtype, device=q.device)
    dv = torch.empty_like(dk)
    bkv = blocks_for("dkv", D, q.dtype, a.act)
    _bwd_kv_kernel[(triton_cdiv(Lk, bkv.n), B * H)](
        q, k, v, dout, dk, dv, invd, shift, zrow, erow, *strides, *dk.stride()[:3], *common,
        ACT=a.act, CAUSAL=a.causal, SHARPEN=a.sharpen, HEAD_DIM=D, BLOCK_M=bkv.m, BLOCK_N=bkv.n,
        **prec, num_warps=bkv.warps, num_stages=bkv.stages)
    if group > 1:
        dk = dk.view(B, Hk, group, Lk, D).sum(2).to(k.dtype)
        dv = dv.view(B, Hk, group, Lk, D).sum(2).to(v.dtype)
    return dq, dk, dv


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


class _TritonActivation(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, a: KernelArgs):
        q, k, v = (t.contiguous() for t in (q, k, v))
        out, den, z = forward(q, k, v, a)
        ctx.a = a
        ctx.has_z = z is not None
        ctx.save_for_backward(q, k, v, out, den, *((z,) if z is not None else ()))
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, den, *rest = ctx.saved_tensors
        z = rest[0] if ctx.has_z else None
        dq, dk, dv = backward(q, k, v, out, den, z, dout.contiguous(), ctx.a)
        return dq, dk, dv, None


def triton_activation_attention(call, spec: ActivationSpec) -> torch.Tensor:
    """Activation attention of a plain causal / noncausal ``call`` with the Triton kernels."""
    q, k, v = call.query, call.key, call.value
    if spec.qk_norm:
        q = qk_layer_norm(q.float()).to(q.dtype)
        k = qk_layer_norm(k.float()).to(k.dtype)
    out = _TritonActivation.apply(q, k, v, kernel_args(call, spec))
    if spec.normalize in ("count", "sqrt_count"):
        n = row_counts_dense(call.q_len, call.k_len, call.is_causal, call.device).clamp_min(1)
        out = out / (n if spec.normalize == "count" else n.sqrt()).to(out.dtype)[:, None]
    return out


__all__ = ["triton_activation_attention", "forward", "backward", "KernelArgs", "kernel_args",
           "blocks_for"]
