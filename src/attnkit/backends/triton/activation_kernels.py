"""Triton kernels of activation attention (the math: :mod:`attnkit.backends.activation`).

Kernels: ``_fwd_kernel`` (one program per query block and batch x head), ``_bwd_q_kernel`` (dq,
per query block) and ``_bwd_kv_kernel`` (dk, dv, per key block, looping over query blocks in the
transposed layout keys x queries), as in FlashAttention-2's backward (Dao 2023, arXiv 2307.08691)
and the Triton fused-attention tutorial (python/tutorials/06-fused-attention.py: separate dk/dv
and dq loops, no atomics). Activation attention keeps no row maximum: sigmoid needs no row
statistic at all, softplus only the row sum D_i (forward) and delta_i = dO_i . out_i (backward).

Scores ``s`` are the raw products ``q . k`` (float32 accumulation); every per-element quantity is
a function of ``s`` and a few row constants, so the softmax scale is folded into them:

- ``MODE 0`` sigmoid: ``w = sigmoid(2 h)`` with ``h = s * hs + hb`` (hs = scale / 2, hb = bias / 2),
  ``dw/ds = scale / 4 * (1 - tanh(h)^2)`` (the factor ``scale / 4`` is applied once per output).
- ``MODE 1`` softplus (LSSA) in base-2 units: ``y = c_i s`` with ``c_i = lam_i scale log2(e)`` and
  ``w = softplus(x) / ln 2 = max(y, 0) + log2(1 + 2^-|y|)`` (x = y ln 2). The factor 1 / ln 2
  cancels in ``out = sum w v / sum w`` and in every gradient (row sums use the same units);
  ``dw/ds = c_i sigmoid(x)``.
- ``MODE 2`` softplus re-weighted by a power with threshold 0: ``u = w^p`` (the row sum Z_i of the
  re-weighting cancels: ``(w / Z)^p / sum (w / Z)^p = w^p / sum w^p``), one pass like MODE 1.
- ``MODE 3`` softplus re-weighted with a threshold: ``u = relu(w / Z_i - thr_i)^p``; Z_i comes from
  a first pass (``ROWSUM_ONLY``) and the backward's row term E_i from ``ROWTERM``.

Tiles: ``[0, full)`` key tiles (forward, dq) or ``[mid, Lq)`` query tiles (dk/dv) are entirely
visible and skip every mask; the causal diagonal tiles and the key tail (Lk not a multiple of the
tile) take the masked path; causal tiles above the diagonal are never visited (loop bounds). Rows
and columns past ``Lq`` / ``Lk`` load zeros. Causal is bottom-right aligned: query i sees key j
iff ``j <= i + Lk - Lq``. Triton 3.x features only (``tl.dot(acc=, input_precision=)``,
``tl.inline_asm_elementwise``).
"""

import triton
import triton.language as tl

from . import LOG2_1P_COEFFS

LOG2E = tl.constexpr(1.4426950408889634)
HALF_LN2 = tl.constexpr(0.34657359027997264)
P0 = tl.constexpr(LOG2_1P_COEFFS[0])
P1 = tl.constexpr(LOG2_1P_COEFFS[1])
P2 = tl.constexpr(LOG2_1P_COEFFS[2])
P3 = tl.constexpr(LOG2_1P_COEFFS[3])
P4 = tl.constexpr(LOG2_1P_COEFFS[4])
P5 = tl.constexpr(LOG2_1P_COEFFS[5])
P6 = tl.constexpr(LOG2_1P_COEFFS[6])


# -- elementwise pieces --------------------------------------------------------------------------
@triton.jit
def _dot(a, b, acc, PREC: tl.constexpr, UPCAST: tl.constexpr):
    # UPCAST: Triton's CPU interpreter multiplies the raw bits of bfloat16 operands
    # (triton-lang/triton#11584); float32 products of bfloat16 values are exact, as on tensor cores
    if UPCAST:
        c = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        c = tl.dot(a, b, acc, input_precision=PREC)
    return c


@triton.jit
def _sigmoid_half(h, FAST: tl.constexpr):
    """``(sigmoid(2h), 1 - tanh(h)^2)``; the second is ``4 sigmoid'(2h)``. FAST (GPU, 16-bit
    inputs): one MUFU ``tanh.approx.f32`` (sigmoid = 0.5 tanh(h) + 0.5, as FlashSigmoid does)."""
    if FAST:
        t = tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=f,f", [h], dtype=tl.float32,
                                      is_pure=True, pack=1)
        w = 0.5 * t + 0.5
        g = 1.0 - t * t
    else:
        w = tl.sigmoid(2.0 * h)
        g = 4.0 * w * (1.0 - w)
    return w, g


@triton.jit
def _softplus_bits(y, POLY: tl.constexpr):
    """``softplus(y ln 2) / ln 2 = max(y, 0) + log2(1 + t)``, ``t = 2^-|y|`` in (0, 1]: no overflow,
    relative accuracy for tiny values. POLY (16-bit inputs): ``log2(1 + t) = t P(t)``, P of degree
    6 (relative error < 1.5e-6, see LOG2_1P_COEFFS): one MUFU op (ex2) per element instead of a
    precise logarithm and a division (Goldberg's ``log(u) t / (u - 1)``, ``u = 1 + t``)."""
    t = tl.exp2(-tl.abs(y))
    if POLY:
        p = P6 * t + P5
        p = p * t + P4
        p = p * t + P3
        p = p * t + P2
        p = p * t + P1
        p = p * t + P0
        lp = t * p
    else:
        u = 1.0 + t
        exact = u == 1.0
        lp = tl.where(exact, t * LOG2E, tl.log2(u) * (t / tl.where(exact, 1.0, u - 1.0)))
    return tl.maximum(y, 0.0) + lp


@triton.jit
def _pow(x, power, IPOW: tl.constexpr):
    """``x^p`` for x >= 0; IPOW in 1..4: the integer power by products (no transcendental)."""
    if IPOW == 1:
        r = x
    elif IPOW == 2:
        r = x * x
    elif IPOW == 3:
        r = x * x * x
    elif IPOW == 4:
        x2 = x * x
        r = x2 * x2
    else:
        pos = x > 0.0
        r = tl.where(pos, tl.exp2(power * tl.log2(tl.where(pos, x, 1.0))), 0.0)
    return r


@triton.jit
def _dpow(x, power, IPOW: tl.constexpr):
    """``d(x^p)/dx = p x^(p-1)`` for x >= 0 (0 at x = 0; the step of relu for p = 1)."""
    if IPOW == 1:
        r = tl.where(x > 0.0, 1.0, 0.0)
    elif IPOW == 2:
        r = 2.0 * x
    elif IPOW == 3:
        r = 3.0 * x * x
    elif IPOW == 4:
        r = 4.0 * x * x * x
    else:
        pos = x > 0.0
        r = tl.where(pos, power * tl.exp2((power - 1.0) * tl.log2(tl.where(pos, x, 1.0))), 0.0)
    return r


@triton.jit
def _weights(s, c, inv_z, thr, hs, hb, power, MODE: tl.constexpr, IPOW: tl.constexpr,
             POLY: tl.constexpr, FAST: tl.constexpr):
    """Final weights u of raw scores s (row constants c, inv_z, thr broadcast by the caller)."""
    if MODE == 0:
        u, _ = _sigmoid_half(s * hs + hb, FAST)
    else:
        w = _softplus_bits(s * c, POLY)
        if MODE == 1:
            u = w
        elif MODE == 2:
            u = _pow(w, power, IPOW)
        else:
            u = _pow(tl.maximum(w * inv_z - thr, 0.0), power, IPOW)
    return u


@triton.jit
def _grads(s, dp, c, ra, rb, inv_z, thr, e, hs, hb, power, MODE: tl.constexpr, IPOW: tl.constexpr,
           NEED_U: tl.constexpr, POLY: tl.constexpr, FAST: tl.constexpr):
    """``(u, ds, r)`` of a tile: the final weights (when NEED_U), dL/ds and mode 3's row-term
    summand ``r = gu du A``. dL/du = dp ra - rb (modes 1, 2: ra = c / D, rb = c delta / D with
    the factor c of dy/ds folded in; mode 3: ra = 1 / D, rb = delta / D)."""
    if MODE == 0:
        u, g = _sigmoid_half(s * hs + hb, FAST)
        ds = dp * g
        r = ds
    else:
        y = s * c
        sig, _ = _sigmoid_half(y * HALF_LN2, FAST)
        if MODE == 1:
            u = sig
            if NEED_U:
                u = _softplus_bits(y, POLY)
            ds = (dp * ra - rb) * sig
            r = ds
        elif MODE == 2:
            w = _softplus_bits(y, POLY)
            u = _pow(w, power, IPOW)
            ds = (dp * ra - rb) * (_dpow(w, power, IPOW) * sig)
            r = ds
        else:
            a = _softplus_bits(y, POLY) * inv_z
            x = tl.maximum(a - thr, 0.0)
            u = _pow(x, power, IPOW)
            gdu = (dp * ra - rb) * _dpow(x, power, IPOW)
            ds = (gdu - e) * (inv_z * c) * sig
            r = gdu * a
    return u, ds, r


@triton.jit
def _key_range(m0, Lq, Lk, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Key tiles of the query block at row m0: ``[0, full)`` visible to every row (no mask),
    ``[full, hi)`` partly visible (causal diagonal, key tail)."""
    if CAUSAL:
        off = Lk - Lq
        hi = tl.minimum(tl.maximum(tl.minimum(m0 + BLOCK_M, Lq) + off, 0), Lk)
        full = tl.minimum(tl.maximum(m0 + off + 1, 0), Lk) // BLOCK_N * BLOCK_N
    else:
        hi = Lk
        full = Lk // BLOCK_N * BLOCK_N
    return full, hi


@triton.jit
def _query_range(n0, Lq, Lk, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Query tiles of the key block at column n0: ``[lo, mid)`` partly visible (causal diagonal),
    ``[mid, Lq)`` visible to every key of the block; tiles above lo see none of it."""
    if CAUSAL:
        off = Lk - Lq
        lo = tl.maximum(n0 - off, 0) // BLOCK_M * BLOCK_M
        mid = tl.minimum(tl.cdiv(tl.maximum(n0 + BLOCK_N - 1 - off, 0), BLOCK_M) * BLOCK_M, Lq)
    else:
        lo = 0
        mid = 0
    return lo, mid


@triton.jit
def _rows(ptr, idx, ok, MASK: tl.constexpr):
    if MASK:
        x = tl.load(ptr + idx, mask=ok, other=0.0)
    else:
        x = tl.load(ptr + idx)
    return x


# -- forward -------------------------------------------------------------------------------------
@triton.jit
def _fwd_tile(acc, den, q, k_ptrs, v_ptrs, start_n, rows, c, inv_z, thr, s_kn, s_vn, Lk, off,
              hs, hb, power, MODE: tl.constexpr, IPOW: tl.constexpr, CAUSAL: tl.constexpr,
              MASKED: tl.constexpr, ROWSUM_ONLY: tl.constexpr, BLOCK_N: tl.constexpr,
              PREC: tl.constexpr, UPCAST: tl.constexpr, POLY: tl.constexpr, FAST: tl.constexpr):
    cols = start_n + tl.arange(0, BLOCK_N)
    col_ok = cols < Lk
    k = _rows(k_ptrs + start_n * s_kn, 0, col_ok[:, None], MASKED)
    s = _dot(q, tl.trans(k), None, PREC, UPCAST)
    if ROWSUM_ONLY:
        u = _softplus_bits(s * c[:, None], POLY)
    else:
        u = _weights(s, c[:, None], inv_z[:, None], thr[:, None], hs, hb, power, MODE, IPOW, POLY, FAST)
    if MASKED:
        keep = col_ok[None, :]
        if CAUSAL:
            keep = keep & (cols[None, :] <= rows[:, None] + off)
        u = tl.where(keep, u, 0.0)
    if MODE != 0:
        den += tl.sum(u, 1)
    if not ROWSUM_ONLY:
        v = _rows(v_ptrs + start_n * s_vn, 0, col_ok[:, None], MASKED)
        acc = _dot(u.to(v.dtype), v, acc, PREC, UPCAST)
    return acc, den


@triton.jit
def _fwd_kernel(Q, K, V, O, DEN, C, INVZ, THR,
                s_qb, s_qh, s_qm, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn, s_ob, s_oh, s_om,
                H, GROUP, Lq, Lk, hs, hb, power,
                MODE: tl.constexpr, IPOW: tl.constexpr, CAUSAL: tl.constexpr,
                ROWSUM_ONLY: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr, POLY: tl.constexpr,
                FAST: tl.constexpr):
    """out_i = sum_j u_ij v_j (modes 1-3: / DEN_i, DEN_i = sum_j u_ij). ROWSUM_ONLY (mode 3's
    first pass): DEN_i = Z_i = sum_j w_ij, no output."""
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)  # causal: the longest rows start first
    pid_bh = tl.program_id(1).to(tl.int64)  # 64-bit offsets: B*H*L*D may pass 2^31
    b = pid_bh // H
    h = pid_bh % H
    hk = h // GROUP
    m0 = pid_m * BLOCK_M
    rows = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = rows < Lq
    q = tl.load(Q + b * s_qb + h * s_qh + rows[:, None] * s_qm + offs_d[None, :],
                mask=row_ok[:, None], other=0.0)
    k_ptrs = K + b * s_kb + hk * s_kh + offs_n[:, None] * s_kn + offs_d[None, :]
    v_ptrs = V + b * s_vb + hk * s_vh + offs_n[:, None] * s_vn + offs_d[None, :]
    c = tl.zeros([BLOCK_M], dtype=tl.float32)
    inv_z = c
    thr = c
    if MODE != 0:
        c = tl.load(C + rows, mask=row_ok, other=0.0)
    if MODE == 3 and not ROWSUM_ONLY:
        inv_z = tl.load(INVZ + pid_bh * Lq + rows, mask=row_ok, other=0.0)
        thr = tl.load(THR + rows, mask=row_ok, other=0.0)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    den = tl.zeros([BLOCK_M], dtype=tl.float32)
    off = Lk - Lq
    full, hi = _key_range(m0, Lq, Lk, CAUSAL, BLOCK_M, BLOCK_N)
    for start_n in range(0, full, BLOCK_N):
        acc, den = _fwd_tile(acc, den, q, k_ptrs, v_ptrs, start_n, rows, c, inv_z, thr, s_kn, s_vn,
                             Lk, off, hs, hb, power, MODE, IPOW, CAUSAL, False, ROWSUM_ONLY, BLOCK_N,
                             PREC, UPCAST, POLY, FAST)
    for start_n in range(full, hi, BLOCK_N):
        acc, den = _fwd_tile(acc, den, q, k_ptrs, v_ptrs, start_n, rows, c, inv_z, thr, s_kn, s_vn,
                             Lk, off, hs, hb, power, MODE, IPOW, CAUSAL, True, ROWSUM_ONLY, BLOCK_N,
                             PREC, UPCAST, POLY, FAST)
    if MODE != 0:
        tl.store(DEN + pid_bh * Lq + rows, den, mask=row_ok)
        acc = acc * tl.where(den > 0.0, 1.0 / tl.where(den > 0.0, den, 1.0), 0.0)[:, None]
    if not ROWSUM_ONLY:
        tl.store(O + b * s_ob + h * s_oh + rows[:, None] * s_om + offs_d[None, :],
                 acc.to(O.dtype.element_ty), mask=row_ok[:, None])
