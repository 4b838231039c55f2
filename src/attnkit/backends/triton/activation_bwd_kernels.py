"""Backward kernels of activation attention: ``_bwd_q_kernel`` (dq per query block; mode 3's row
term E with ``ROWTERM``) and ``_bwd_kv_kernel`` (dk, dv per key block). Notation, modes and tile
ranges: :mod:`.activation_kernels`. Row inputs (float32): ``C`` and ``THR`` are ``(Lq,)`` (the
same for every head), ``RW``, ``RA``, ``RB``, ``INVZ``, ``E`` are ``(B, H, Lq)``:

- mode 0 (sigmoid): none; ``ds = dp (1 - tanh(h)^2)``, dq and dk scaled by ``scale / 4`` at the end.
- modes 1, 2: ``RW = 1 / D``, ``RA = c / D``, ``RB = c delta / D`` (delta_i = dO_i . out_i).
- mode 3: ``RW = RA = 1 / D``, ``RB = delta / D``, ``INVZ = 1 / Z``, ``E`` (from ``ROWTERM``).

In the dk/dv kernel a query row past ``Lq`` loads zeros for q, dO and every row input, so its
gradient terms vanish without a score mask.
"""

import triton
import triton.language as tl

from .activation_kernels import _dot, _grads, _key_range, _query_range, _rows


@triton.jit
def _dq_tile(dq, esum, q, do, k_ptrs, v_ptrs, start_n, rows, c, ra, rb, inv_z, thr, e, s_kn, s_vn,
             Lk, off, hs, hb, power, MODE: tl.constexpr, IPOW: tl.constexpr, CAUSAL: tl.constexpr,
             MASKED: tl.constexpr, ROWTERM: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr,
             UPCAST: tl.constexpr, POLY: tl.constexpr, FAST: tl.constexpr):
    cols = start_n + tl.arange(0, BLOCK_N)
    col_ok = cols < Lk
    k = _rows(k_ptrs + start_n * s_kn, 0, col_ok[:, None], MASKED)
    v = _rows(v_ptrs + start_n * s_vn, 0, col_ok[:, None], MASKED)
    s = _dot(q, tl.trans(k), None, PREC, UPCAST)
    dp = _dot(do, tl.trans(v), None, PREC, UPCAST)
    _, ds, r = _grads(s, dp, c[:, None], ra[:, None], rb[:, None], inv_z[:, None], thr[:, None],
                      e[:, None], hs, hb, power, MODE, IPOW, False, POLY, FAST)
    if ROWTERM:
        if MASKED:
            keep = col_ok[None, :]
            if CAUSAL:
                keep = keep & (cols[None, :] <= rows[:, None] + off)
            r = tl.where(keep, r, 0.0)
        esum += tl.sum(r, 1)
    else:
        if MASKED and CAUSAL:  # k is 0 past Lk: only the causal mask matters here
            ds = tl.where(cols[None, :] <= rows[:, None] + off, ds, 0.0)
        dq = _dot(ds.to(k.dtype), k, dq, PREC, UPCAST)
    return dq, esum


@triton.jit
def _bwd_q_kernel(Q, K, V, DO, DQ, C, RA, RB, INVZ, THR, E,
                  s_qb, s_qh, s_qm, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn,
                  H, GROUP, Lq, Lk, hs, hb, power, out_scale,
                  MODE: tl.constexpr, IPOW: tl.constexpr, CAUSAL: tl.constexpr, ROWTERM: tl.constexpr,
                  HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  PREC: tl.constexpr, UPCAST: tl.constexpr, POLY: tl.constexpr, FAST: tl.constexpr):
    """dq_i = out_scale sum_j ds_ij k_j (DQ, DO have q's strides). ROWTERM: E_i = sum_j gu du A."""
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
    q_off = b * s_qb + h * s_qh + rows[:, None] * s_qm + offs_d[None, :]
    q = tl.load(Q + q_off, mask=row_ok[:, None], other=0.0)
    do = tl.load(DO + q_off, mask=row_ok[:, None], other=0.0)
    k_ptrs = K + b * s_kb + hk * s_kh + offs_n[:, None] * s_kn + offs_d[None, :]
    v_ptrs = V + b * s_vb + hk * s_vh + offs_n[:, None] * s_vn + offs_d[None, :]
    stat = pid_bh * Lq + rows
    c = tl.zeros([BLOCK_M], dtype=tl.float32)
    ra = c
    rb = c
    inv_z = c
    thr = c
    e = c
    if MODE != 0:
        c = tl.load(C + rows, mask=row_ok, other=0.0)
        ra = tl.load(RA + stat, mask=row_ok, other=0.0)
        rb = tl.load(RB + stat, mask=row_ok, other=0.0)
    if MODE == 3:
        inv_z = tl.load(INVZ + stat, mask=row_ok, other=0.0)
        thr = tl.load(THR + rows, mask=row_ok, other=0.0)
        if not ROWTERM:
            e = tl.load(E + stat, mask=row_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    esum = tl.zeros([BLOCK_M], dtype=tl.float32)
    off = Lk - Lq
    full, hi = _key_range(m0, Lq, Lk, CAUSAL, BLOCK_M, BLOCK_N)
    for start_n in range(0, full, BLOCK_N):
        dq, esum = _dq_tile(dq, esum, q, do, k_ptrs, v_ptrs, start_n, rows, c, ra, rb, inv_z, thr, e,
                            s_kn, s_vn, Lk, off, hs, hb, power, MODE, IPOW, CAUSAL, False, ROWTERM,
                            BLOCK_N, PREC, UPCAST, POLY, FAST)
    for start_n in range(full, hi, BLOCK_N):
        dq, esum = _dq_tile(dq, esum, q, do, k_ptrs, v_ptrs, start_n, rows, c, ra, rb, inv_z, thr, e,
                            s_kn, s_vn, Lk, off, hs, hb, power, MODE, IPOW, CAUSAL, True, ROWTERM,
                            BLOCK_N, PREC, UPCAST, POLY, FAST)
    if ROWTERM:
        tl.store(E + stat, esum, mask=row_ok)
    else:
        tl.store(DQ + q_off, (dq * out_scale).to(DQ.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def _kv_tile(dk, dv, k, v, q_ptrs, do_ptrs, start_m, cols, C, RW, RA, RB, INVZ, THR, E, stat0, Lq, off, s_qm,
             hs, hb, power, MODE: tl.constexpr, IPOW: tl.constexpr, CAUSAL: tl.constexpr,
             MASKED: tl.constexpr, EVEN_M: tl.constexpr, BLOCK_M: tl.constexpr, PREC: tl.constexpr,
             UPCAST: tl.constexpr, POLY: tl.constexpr, FAST: tl.constexpr):
    rows = start_m + tl.arange(0, BLOCK_M)
    row_ok = rows < Lq
    bounded = MASKED or not EVEN_M
    q = _rows(q_ptrs + start_m * s_qm, 0, row_ok[:, None], bounded)
    do = _rows(do_ptrs + start_m * s_qm, 0, row_ok[:, None], bounded)
    st = _dot(k, tl.trans(q), None, PREC, UPCAST)  # keys x queries
    dpt = _dot(v, tl.trans(do), None, PREC, UPCAST)
    zero = tl.zeros([BLOCK_M], dtype=tl.float32)
    c = zero
    rw = zero
    ra = zero
    rb = zero
    inv_z = zero
    thr = zero
    e = zero
    if MODE != 0:
        c = _rows(C, rows, row_ok, bounded)
        rw = _rows(RW, stat0 + rows, row_ok, bounded)
        ra = _rows(RA, stat0 + rows, row_ok, bounded)
        rb = _rows(RB, stat0 + rows, row_ok, bounded)
    if MODE == 3:
        inv_z = _rows(INVZ, stat0 + rows, row_ok, bounded)
        thr = _rows(THR, rows, row_ok, bounded)
        e = _rows(E, stat0 + rows, row_ok, bounded)
    ut, dst, _ = _grads(st, dpt, c[None, :], ra[None, :], rb[None, :], inv_z[None, :], thr[None, :],
                        e[None, :], hs, hb, power, MODE, IPOW, True, POLY, FAST)
    if MODE != 0:
        ut = ut * rw[None, :]
    if MASKED and CAUSAL:
        keep = cols[:, None] <= rows[None, :] + off
        ut = tl.where(keep, ut, 0.0)
        dst = tl.where(keep, dst, 0.0)
    dv = _dot(ut.to(do.dtype), do, dv, PREC, UPCAST)
    dk = _dot(dst.to(q.dtype), q, dk, PREC, UPCAST)
    return dk, dv


@triton.jit
def _bwd_kv_kernel(Q, K, V, DO, DK, DV, C, RW, RA, RB, INVZ, THR, E,
                   s_qb, s_qh, s_qm, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn, s_gb, s_gh, s_gn,
                   H, GROUP, Lq, Lk, hs, hb, power, out_scale,
                   MODE: tl.constexpr, IPOW: tl.constexpr, CAUSAL: tl.constexpr, EVEN_M: tl.constexpr,
                   HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   PREC: tl.constexpr, UPCAST: tl.constexpr, POLY: tl.constexpr, FAST: tl.constexpr):
    """dk_j = out_scale sum_i ds_ij q_i, dv_j = sum_i u_ij RW_i dO_i of one query head (DK, DV:
    ``(B, H, Lk, D)``, strides s_g*). DO has q's strides. EVEN_M: Lq is a multiple of BLOCK_M."""
    pid_n = tl.program_id(0)  # causal: the first key blocks see the most rows and start first
    pid_bh = tl.program_id(1).to(tl.int64)  # 64-bit offsets: B*H*L*D may pass 2^31
    b = pid_bh // H
    h = pid_bh % H
    hk = h // GROUP
    n0 = pid_n * BLOCK_N
    cols = n0 + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    col_ok = cols < Lk
    k = tl.load(K + b * s_kb + hk * s_kh + cols[:, None] * s_kn + offs_d[None, :],
                mask=col_ok[:, None], other=0.0)
    v = tl.load(V + b * s_vb + hk * s_vh + cols[:, None] * s_vn + offs_d[None, :],
                mask=col_ok[:, None], other=0.0)
    q_off = b * s_qb + h * s_qh + offs_m[:, None] * s_qm + offs_d[None, :]
    q_ptrs = Q + q_off
    do_ptrs = DO + q_off
    stat0 = pid_bh * Lq
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    off = Lk - Lq
    lo, mid = _query_range(n0, Lq, Lk, CAUSAL, BLOCK_M, BLOCK_N)
    for start_m in range(lo, mid, BLOCK_M):
        dk, dv = _kv_tile(dk, dv, k, v, q_ptrs, do_ptrs, start_m, cols, C, RW, RA, RB, INVZ, THR, E, stat0, Lq,
                          off, s_qm, hs, hb, power, MODE, IPOW, CAUSAL, True, EVEN_M, BLOCK_M, PREC,
                          UPCAST, POLY, FAST)
    for start_m in range(mid, Lq, BLOCK_M):
        dk, dv = _kv_tile(dk, dv, k, v, q_ptrs, do_ptrs, start_m, cols, C, RW, RA, RB, INVZ, THR, E, stat0, Lq,
                          off, s_qm, hs, hb, power, MODE, IPOW, CAUSAL, False, EVEN_M, BLOCK_M, PREC,
                          UPCAST, POLY, FAST)
    g_off = b * s_gb + h * s_gh + cols[:, None] * s_gn + offs_d[None, :]
    tl.store(DK + g_off, (dk * out_scale).to(DK.dtype.element_ty), mask=col_ok[:, None])
    tl.store(DV + g_off, dv.to(DV.dtype.element_ty), mask=col_ok[:, None])
