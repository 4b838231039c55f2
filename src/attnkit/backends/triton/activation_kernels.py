"""Triton kernels of activation attention (see :mod:`attnkit.backends.activation` for the math).

One program per (query block, batch x head) in the forward and dq kernels, per (key block,
batch x head) in the dk/dv kernel. Scores and weights are float32 (``tl.dot`` accumulates in
float32); weights are cast to the input dtype before the second product, as FlashAttention does.
Rows and columns past ``Lq`` / ``Lk`` are masked (any length). Causal is bottom-right aligned:
query i sees key j iff ``j <= i + Lk - Lq``.

Row quantities: ``n_i`` (visible keys) and ``lam_i = length_scale * log(n_i)`` are computed in the
kernels; ``Z_i`` (row sums of w, re-weighting only), ``1/D_i``, ``delta_i / D_i`` and ``E_i`` come
from the caller (``(B, H, Lq)`` float32). ``ACT``: 0 = sigmoid(s + bias), 1 = softplus(lam_i s).
Triton features used are those of Triton 3.x (``tl.dot(input_precision=...)``, ``tl.trans``).
"""

import triton
import triton.language as tl


@triton.jit
def _dot(a, b, PREC: tl.constexpr, UPCAST: tl.constexpr):
    # UPCAST: Triton's CPU interpreter multiplies the raw bits of bfloat16 operands
    # (triton-lang/triton#11584); float32 products of bfloat16 values are exact, as on tensor cores
    if UPCAST:
        c = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        c = tl.dot(a, b, input_precision=PREC)
    return c


@triton.jit
def _softplus(x):
    # log(1 + e^x) = max(x, 0) + log1p(e^-|x|), log1p(t) = log(u) * t / (u - 1) with u = 1 + t
    t = tl.exp(-tl.abs(x))
    u = 1.0 + t
    exact = u == 1.0
    lp = tl.where(exact, t, tl.log(u) * (t / tl.where(exact, 1.0, u - 1.0)))
    return tl.maximum(x, 0.0) + lp


@triton.jit
def _sigmoid(x, FAST: tl.constexpr):
    # FAST (GPU, half-precision inputs): sigmoid(x) = 0.5 tanh(x / 2) + 0.5 with one MUFU
    # tanh.approx.f32 (relative error ~2^-11, below bfloat16 rounding), as FlashSigmoid does
    if FAST:
        t = tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=f,f", [x * 0.5], dtype=tl.float32,
                                      is_pure=True, pack=1)
        y = 0.5 * t + 0.5
    else:
        y = tl.sigmoid(x)
    return y


@triton.jit
def _weights(s, lam, bias, mask, ACT: tl.constexpr, FAST: tl.constexpr):
    if ACT == 0:
        w = _sigmoid(s + bias, FAST)
    else:
        w = _softplus(lam * s)
    return tl.where(mask, w, 0.0)


@triton.jit
def _slope(s, w, lam, ACT: tl.constexpr, FAST: tl.constexpr):
    if ACT == 0:
        d = w * (1.0 - w)
    else:
        d = lam * _sigmoid(lam * s, FAST)
    return d


@triton.jit
def _sharpen(w, inv_z, thr, power):
    """A = w / Z, u = relu(A - thr)^p and du/dA = p relu(A - thr)^(p-1)."""
    a = w * inv_z
    x = a - thr
    pos = x > 0.0
    lx = tl.log(tl.where(pos, x, 1.0))
    u = tl.where(pos, tl.exp(power * lx), 0.0)
    du = tl.where(pos, power * tl.exp((power - 1.0) * lx), 0.0)
    return a, u, du


@triton.jit
def _row_count(rows, Lq, Lk, CAUSAL: tl.constexpr):
    if CAUSAL:
        n = tl.minimum(tl.maximum(rows + (Lk - Lq) + 1, 0), Lk)
    else:
        n = tl.zeros_like(rows) + Lk
    return n.to(tl.float32)


@triton.jit
def _fwd_kernel(Q, K, V, O, DEN, ZROW,
                s_qb, s_qh, s_qm, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn, s_ob, s_oh, s_om,
                H, GROUP, Lq, Lk, scale, bias, length_scale, power, threshold,
                ACT: tl.constexpr, CAUSAL: tl.constexpr, NORM_SUM: tl.constexpr,
                SHARPEN: tl.constexpr, ROWSUM_ONLY: tl.constexpr, HEAD_DIM: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
                FAST: tl.constexpr):
    """out_i = sum_j u_ij v_j (/ sum_j u_ij); DEN_i = sum_j u_ij. ROWSUM_ONLY: DEN_i = sum_j w_ij."""
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)  # causal: the longest rows start first
    pid_bh = tl.program_id(1).to(tl.int64)  # 64-bit offsets: B*H*L*D may pass 2^31
    b = pid_bh // H
    h = pid_bh % H
    hk = h // GROUP
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = rows < Lq
    q = tl.load(Q + b * s_qb + h * s_qh + rows[:, None] * s_qm + offs_d[None, :],
                mask=row_ok[:, None], other=0.0)
    k_base = K + b * s_kb + hk * s_kh
    v_base = V + b * s_vb + hk * s_vh
    off = Lk - Lq
    n = _row_count(rows, Lq, Lk, CAUSAL)
    lam = length_scale * tl.log(tl.maximum(n, 1.0))
    thr = threshold / tl.maximum(n, 1.0)
    inv_z = tl.zeros([BLOCK_M], dtype=tl.float32)
    if SHARPEN:
        if not ROWSUM_ONLY:
            z = tl.load(ZROW + pid_bh * Lq + rows, mask=row_ok, other=0.0)
            inv_z = tl.where(z > 0.0, 1.0 / tl.where(z > 0.0, z, 1.0), 0.0)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    den = tl.zeros([BLOCK_M], dtype=tl.float32)
    hi = Lk
    if CAUSAL:
        hi = tl.minimum(Lk, (pid_m + 1) * BLOCK_M + off)
    for start_n in range(0, hi, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < Lk
        k = tl.load(k_base + cols[:, None] * s_kn + offs_d[None, :], mask=col_ok[:, None], other=0.0)
        s = _dot(q, tl.trans(k), PREC, UPCAST) * scale
        mask = col_ok[None, :]
        if CAUSAL:
            mask = mask & (cols[None, :] <= rows[:, None] + off)
        w = _weights(s, lam[:, None], bias, mask, ACT, FAST)
        if ROWSUM_ONLY:
            den += tl.sum(w, 1)
        else:
            u = w
            if SHARPEN:
                a, u, du = _sharpen(w, inv_z[:, None], thr[:, None], power)
            v = tl.load(v_base + cols[:, None] * s_vn + offs_d[None, :], mask=col_ok[:, None], other=0.0)
            acc += _dot(u.to(v.dtype), v, PREC, UPCAST)
            den += tl.sum(u, 1)
    tl.store(DEN + pid_bh * Lq + rows, den, mask=row_ok)
    if not ROWSUM_ONLY:
        if NORM_SUM:
            acc = acc * tl.where(den > 0.0, 1.0 / tl.where(den > 0.0, den, 1.0), 0.0)[:, None]
        tl.store(O + b * s_ob + h * s_oh + rows[:, None] * s_om + offs_d[None, :],
                 acc.to(O.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def _bwd_q_kernel(Q, K, V, DO, DQ, INVD, SHIFT, ZROW, EROW,
                  s_qb, s_qh, s_qm, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn,
                  H, GROUP, Lq, Lk, scale, bias, length_scale, power, threshold,
                  ACT: tl.constexpr, CAUSAL: tl.constexpr, SHARPEN: tl.constexpr,
                  ROWTERM: tl.constexpr, HEAD_DIM: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
                FAST: tl.constexpr):
    """dq_i = scale sum_j ds_ij k_j (DQ has q's strides). ROWTERM: EROW_i = sum_j gu_ij du_ij A_ij."""
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)  # causal: the longest rows start first
    pid_bh = tl.program_id(1).to(tl.int64)  # 64-bit offsets: B*H*L*D may pass 2^31
    b = pid_bh // H
    h = pid_bh % H
    hk = h // GROUP
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = rows < Lq
    q_off = b * s_qb + h * s_qh + rows[:, None] * s_qm + offs_d[None, :]
    q = tl.load(Q + q_off, mask=row_ok[:, None], other=0.0)
    do = tl.load(DO + q_off, mask=row_ok[:, None], other=0.0)
    k_base = K + b * s_kb + hk * s_kh
    v_base = V + b * s_vb + hk * s_vh
    off = Lk - Lq
    n = _row_count(rows, Lq, Lk, CAUSAL)
    lam = length_scale * tl.log(tl.maximum(n, 1.0))
    thr = threshold / tl.maximum(n, 1.0)
    stat = pid_bh * Lq + rows
    invd = tl.load(INVD + stat, mask=row_ok, other=0.0)
    shift = tl.load(SHIFT + stat, mask=row_ok, other=0.0)
    inv_z = tl.zeros([BLOCK_M], dtype=tl.float32)
    e = tl.zeros([BLOCK_M], dtype=tl.float32)
    if SHARPEN:
        z = tl.load(ZROW + stat, mask=row_ok, other=0.0)
        inv_z = tl.where(z > 0.0, 1.0 / tl.where(z > 0.0, z, 1.0), 0.0)
        if not ROWTERM:
            e = tl.load(EROW + stat, mask=row_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    hi = Lk
    if CAUSAL:
        hi = tl.minimum(Lk, (pid_m + 1) * BLOCK_M + off)
    for start_n in range(0, hi, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < Lk
        k = tl.load(k_base + cols[:, None] * s_kn + offs_d[None, :], mask=col_ok[:, None], other=0.0)
        v = tl.load(v_base + cols[:, None] * s_vn + offs_d[None, :], mask=col_ok[:, None], other=0.0)
        s = _dot(q, tl.trans(k), PREC, UPCAST) * scale
        mask = col_ok[None, :]
        if CAUSAL:
            mask = mask & (cols[None, :] <= rows[:, None] + off)
        w = _weights(s, lam[:, None], bias, mask, ACT, FAST)
        dp = _dot(do, tl.trans(v), PREC, UPCAST)
        gu = dp * invd[:, None] - shift[:, None]
        if ROWTERM:
            a, u, du = _sharpen(w, inv_z[:, None], thr[:, None], power)
            e += tl.sum(gu * du * a, 1)
        else:
            if SHARPEN:
                a, u, du = _sharpen(w, inv_z[:, None], thr[:, None], power)
                gu = (gu * du - e[:, None]) * inv_z[:, None]
            ds = tl.where(mask, gu * _slope(s, w, lam[:, None], ACT, FAST), 0.0)
            dq += _dot(ds.to(k.dtype), k, PREC, UPCAST)
    if ROWTERM:
        tl.store(EROW + stat, e, mask=row_ok)
    else:
        tl.store(DQ + q_off, (dq * scale).to(DQ.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def _bwd_kv_kernel(Q, K, V, DO, DK, DV, INVD, SHIFT, ZROW, EROW,
                   s_qb, s_qh, s_qm, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn, s_gb, s_gh, s_gn,
                   H, GROUP, Lq, Lk, scale, bias, length_scale, power, threshold,
                   ACT: tl.constexpr, CAUSAL: tl.constexpr, SHARPEN: tl.constexpr,
                   HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   PREC: tl.constexpr, UPCAST: tl.constexpr,
                FAST: tl.constexpr):
    """dk_j, dv_j of one query head (DK, DV: ``(B, H, Lk, D)``, strides s_g*), in the transposed
    layout: scores (keys x queries)."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)  # 64-bit offsets: B*H*L*D may pass 2^31
    b = pid_bh // H
    h = pid_bh % H
    hk = h // GROUP
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    col_ok = cols < Lk
    k = tl.load(K + b * s_kb + hk * s_kh + cols[:, None] * s_kn + offs_d[None, :],
                mask=col_ok[:, None], other=0.0)
    v = tl.load(V + b * s_vb + hk * s_vh + cols[:, None] * s_vn + offs_d[None, :],
                mask=col_ok[:, None], other=0.0)
    q_base = b * s_qb + h * s_qh
    off = Lk - Lq
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    lo = 0
    if CAUSAL:
        lo = tl.maximum(pid_n * BLOCK_N - off, 0) // BLOCK_M * BLOCK_M
    for start_m in range(lo, Lq, BLOCK_M):
        rows = start_m + offs_m
        row_ok = rows < Lq
        q_off = q_base + rows[:, None] * s_qm + offs_d[None, :]
        q = tl.load(Q + q_off, mask=row_ok[:, None], other=0.0)
        do = tl.load(DO + q_off, mask=row_ok[:, None], other=0.0)
        n = _row_count(rows, Lq, Lk, CAUSAL)
        lam = length_scale * tl.log(tl.maximum(n, 1.0))
        stat = pid_bh * Lq + rows
        invd = tl.load(INVD + stat, mask=row_ok, other=0.0)
        shift = tl.load(SHIFT + stat, mask=row_ok, other=0.0)
        st = _dot(k, tl.trans(q), PREC, UPCAST) * scale
        mask = col_ok[:, None] & row_ok[None, :]
        if CAUSAL:
            mask = mask & (cols[:, None] <= rows[None, :] + off)
        wt = _weights(st, lam[None, :], bias, mask, ACT, FAST)
        ut = wt
        dpt = _dot(v, tl.trans(do), PREC, UPCAST)
        gut = dpt * invd[None, :] - shift[None, :]
        if SHARPEN:
            z = tl.load(ZROW + stat, mask=row_ok, other=0.0)
            inv_z = tl.where(z > 0.0, 1.0 / tl.where(z > 0.0, z, 1.0), 0.0)
            e = tl.load(EROW + stat, mask=row_ok, other=0.0)
            thr = threshold / tl.maximum(n, 1.0)
            at, ut, dut = _sharpen(wt, inv_z[None, :], thr[None, :], power)
            gut = (gut * dut - e[None, :]) * inv_z[None, :]
        dv += _dot((ut * invd[None, :]).to(do.dtype), do, PREC, UPCAST)
        dst = tl.where(mask, gut * _slope(st, wt, lam[None, :], ACT, FAST), 0.0)
        dk += _dot(dst.to(q.dtype), q, PREC, UPCAST)
    g_off = b * s_gb + h * s_gh + cols[:, None] * s_gn + offs_d[None, :]
    tl.store(DK + g_off, (dk * scale).to(DK.dtype.element_ty), mask=col_ok[:, None])
    tl.store(DV + g_off, dv.to(DV.dtype.element_ty), mask=col_ok[:, None])
