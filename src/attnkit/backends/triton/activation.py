"""The ``triton`` backend of activation attention: launches the kernels of
:mod:`.activation_kernels` and :mod:`.activation_bwd_kernels` (imported here on first use) inside
an autograd Function.

Shapes: q ``(B, H, Lq, D)``, k / v ``(B, Hkv, Lk, D)`` (GQA read in place: query head h uses kv head
``h // (H // Hkv)``), D = Dv in {16, 32, 64, 128}; float16 / bfloat16 / float32 inputs (float32
products in IEEE precision, not TF32). Kernel modes (:mod:`.activation_kernels`): 0 sigmoid,
1 softplus (LSSA), 2 softplus re-weighted by a power (threshold 0: one pass), 3 re-weighted with a
threshold (a row-sum pass first).

Forward: one kernel (two in mode 3). Backward: the row inputs in torch (``delta = dO . out``), a
dq kernel and a dk/dv kernel (plus a row-term kernel in mode 3); dk / dv are per query head and
summed over each GQA group. ``normalize="count"`` / ``"sqrt_count"`` divide the kernel's output
outside the kernels. Tile sizes: :func:`blocks_for` (a table; :func:`use_tiles` overrides it, for
benchmarks).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from ..activation import ActivationSpec, LengthScaledSoftplus, qk_layer_norm, row_counts_dense
from . import fix_interpreter_scalars, interpreting

MODES = ("sigmoid", "softplus", "softplus_power", "softplus_threshold")


@dataclass(frozen=True)
class KernelArgs:
    """The numbers and switches every kernel takes; ``mode`` indexes MODES."""

    mode: int
    causal: bool
    scale: float
    bias: float = 0.0
    length_scale: float = 0.0
    power: float = 1.0
    threshold: float = 0.0

    @property
    def ipow(self) -> int:
        """The power as a small integer the kernels multiply out (0: any other power)."""
        return int(self.power) if self.power in (1.0, 2.0, 3.0, 4.0) else 0


@dataclass(frozen=True)
class Blocks:
    """Tile sizes and launch settings of one kernel: ``m`` queries x ``n`` keys per tile."""

    m: int
    n: int
    warps: int
    stages: int


# 16-bit inputs, by kernel and head dim (<= 64, 128). Each compiles for sm_90 with Triton 3.6
# without register spills and with wgmma (Hopper tensor-core) products for every dot
# (scripts/check_triton_compile.py): the dk/dv kernel needs >= 64 keys per tile for that (its
# products have the keys as rows), the others >= 64 queries.
TILES = {
    "fwd": {64: Blocks(128, 64, 4, 3), 128: Blocks(128, 64, 8, 3)},
    "dq": {64: Blocks(128, 64, 8, 2), 128: Blocks(128, 64, 8, 2)},
    "dkv": {64: Blocks(64, 128, 8, 2), 128: Blocks(64, 128, 8, 2)},
}
# Alternatives timed by ``scripts/gpu/bench_softmax_free.py --sweep`` (16-bit, any head dim).
CANDIDATE_TILES = {
    "fwd": (Blocks(128, 64, 4, 3), Blocks(128, 64, 8, 3), Blocks(128, 128, 8, 2)),
    "dq": (Blocks(128, 64, 8, 2), Blocks(128, 32, 8, 3), Blocks(64, 64, 4, 3)),
    "dkv": (Blocks(64, 128, 8, 2), Blocks(32, 128, 8, 3), Blocks(64, 64, 4, 3)),
}
_override: dict[str, Blocks] = {}


@contextmanager
def use_tiles(**tiles: Blocks):
    """Run the kernels named (``fwd``, ``dq``, ``dkv``) with these tiles, whatever the dtype and
    head dim, inside the block (benchmark sweeps)."""
    unknown = set(tiles) - set(TILES)
    if unknown:
        raise ValueError(f"unknown kernel(s) {sorted(unknown)}; allowed: {sorted(TILES)}")
    saved = dict(_override)
    _override.update(tiles)
    try:
        yield
    finally:
        _override.clear()
        _override.update(saved)


def blocks_for(kind: str, head_dim: int, dtype: torch.dtype) -> Blocks:
    """The tiles of one kernel. Float32 inputs use half the tiles and 2 stages (twice the shared
    memory and registers per element; no tensor-core products in IEEE precision)."""
    if kind in _override:
        return _override[kind]
    b = TILES[kind][64 if head_dim <= 64 else 128]
    if dtype == torch.float32:
        b = Blocks(max(16, b.m // 2), max(16, b.n // 2), b.warps, 2)
    return b


def kernel_args(call, spec: ActivationSpec) -> KernelArgs:
    act = spec.activation
    if type(act) is not LengthScaledSoftplus:
        return KernelArgs(0, call.is_causal, call.scale, bias=act.bias)
    power, threshold = spec.sharpen if spec.sharpen is not None else (1.0, 0.0)
    mode = 1 if spec.sharpen is None else (2 if threshold == 0 else 3)
    return KernelArgs(mode, call.is_causal, call.scale, length_scale=act.length_scale, power=power,
                      threshold=threshold)


def _precision(dtype: torch.dtype) -> dict:
    """Kernel settings by dtype: IEEE float32 products for float32 inputs (not TF32); for 16-bit
    inputs the polynomial log2(1 + t) (POLY) and, on a GPU, the tanh.approx sigmoid (FAST);
    under the CPU interpreter bfloat16 dot operands are upcast (its bfloat16 dot is wrong,
    triton-lang/triton#11584)."""
    half = dtype != torch.float32
    return dict(PREC="tf32" if half else "ieee", UPCAST=interpreting() and dtype == torch.bfloat16,
                POLY=half, FAST=half and not interpreting())


def _launch(kind: str, D: int, dtype: torch.dtype) -> tuple[Blocks, dict]:
    b = blocks_for(kind, D, dtype)
    return b, dict(HEAD_DIM=D, BLOCK_M=b.m, BLOCK_N=b.n, num_warps=b.warps, num_stages=b.stages,
                   **_precision(dtype))


def _row_constants(a: KernelArgs, Lq: int, Lk: int, device):
    """``(c, thr)``, each ``(Lq,)`` float32: ``c_i = length_scale log(n_i) scale log2(e)`` and
    ``thr_i = threshold / n_i`` (n_i visible keys of row i, at least 1)."""
    n = row_counts_dense(Lq, Lk, a.causal, device).clamp_min(1)
    c = (a.length_scale * torch.log(n)) * (a.scale * math.log2(math.e))
    return c.contiguous(), (a.threshold / n).contiguous()


def _inverse(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x > 0, 1 / torch.where(x > 0, x, torch.ones_like(x)), torch.zeros_like(x))


def _scalars(a: KernelArgs, H: int, group: int, Lq: int, Lk: int):
    return (H, group, Lq, Lk, 0.5 * a.scale, 0.5 * a.bias, a.power)


def forward(q, k, v, a: KernelArgs):
    """Returns out ``(B, H, Lq, D)``, the row sums D_i of the final weights (modes 1-3, base-2
    units) and, in mode 3, ``1 / Z_i``."""
    from .activation_kernels import _fwd_kernel

    fix_interpreter_scalars()
    B, H, Lq, D = q.shape
    Lk, group = k.shape[2], H // k.shape[1]
    out = torch.empty_like(q)
    dummy = torch.zeros(1, dtype=torch.float32, device=q.device)
    c, thr = _row_constants(a, Lq, Lk, q.device) if a.mode else (dummy, dummy)
    den = torch.empty(B, H, Lq, dtype=torch.float32, device=q.device) if a.mode else dummy
    blk, flags = _launch("fwd", D, q.dtype)
    grid = (triton_cdiv(Lq, blk.m), B * H)
    strides = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3])
    scalars = _scalars(a, H, group, Lq, Lk)
    flags.update(IPOW=a.ipow, CAUSAL=a.causal)
    inv_z = dummy
    if a.mode == 3:
        z = torch.empty_like(den)
        _fwd_kernel[grid](q, k, v, out, z, c, dummy, thr, *strides, *scalars, MODE=3, ROWSUM_ONLY=True,
                          **flags)
        inv_z = _inverse(z)
    _fwd_kernel[grid](q, k, v, out, den, c, inv_z, thr, *strides, *scalars, MODE=a.mode,
                      ROWSUM_ONLY=False, **flags)
    return out, den, inv_z


def backward(q, k, v, out, den, inv_z, dout, a: KernelArgs):
    from .activation_bwd_kernels import _bwd_kv_kernel, _bwd_q_kernel

    fix_interpreter_scalars()
    B, H, Lq, D = q.shape
    Hk, Lk = k.shape[1], k.shape[2]
    group = H // Hk
    dummy = torch.zeros(1, dtype=torch.float32, device=q.device)
    c = thr = rw = ra = rb = e = dummy
    if a.mode:
        c, thr = _row_constants(a, Lq, Lk, q.device)
        rw = _inverse(den)
        shift = (dout.float() * out.float()).sum(-1) * rw
        ra, rb = (rw * c, shift * c) if a.mode in (1, 2) else (rw, shift)
    if a.mode == 3:
        e = torch.empty_like(den)
    scalars = (*_scalars(a, H, group, Lq, Lk), 0.25 * a.scale if a.mode == 0 else 1.0)
    strides = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3])
    bq, flags = _launch("dq", D, q.dtype)
    flags.update(MODE=a.mode, IPOW=a.ipow, CAUSAL=a.causal)
    grid_q = (triton_cdiv(Lq, bq.m), B * H)
    dq = torch.empty_like(q)
    rows_q = (c, ra, rb, inv_z, thr, e)
    if a.mode == 3:
        _bwd_q_kernel[grid_q](q, k, v, dout, dq, *rows_q, *strides, *scalars, ROWTERM=True, **flags)
    _bwd_q_kernel[grid_q](q, k, v, dout, dq, *rows_q, *strides, *scalars, ROWTERM=False, **flags)
    gdtype = k.dtype if group == 1 else torch.float32
    dk = torch.empty(B, H, Lk, D, dtype=gdtype, device=q.device)
    dv = torch.empty_like(dk)
    bkv, flags = _launch("dkv", D, q.dtype)
    flags.update(MODE=a.mode, IPOW=a.ipow, CAUSAL=a.causal, EVEN_M=Lq % bkv.m == 0)
    _bwd_kv_kernel[(triton_cdiv(Lk, bkv.n), B * H)](
        q, k, v, dout, dk, dv, c, rw, ra, rb, inv_z, thr, e, *strides, *dk.stride()[:3], *scalars, **flags)
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
        out, den, inv_z = forward(q, k, v, a)
        ctx.a = a
        ctx.save_for_backward(q, k, v, out, den, inv_z)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, den, inv_z = ctx.saved_tensors
        dq, dk, dv = backward(q, k, v, out, den, inv_z, dout.contiguous(), ctx.a)
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
           "Blocks", "TILES", "CANDIDATE_TILES", "blocks_for", "use_tiles", "MODES"]
