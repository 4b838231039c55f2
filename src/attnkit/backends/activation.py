"""Activation attention engines: an elementwise weight per visible (query, key) pair instead of a
row softmax, then an optional row normalisation (sigmoid attention, softplus attention...).

For query row i with visible keys ``j`` (pattern, ``is_causal`` and ``attn_mask``; a float mask is
added to the scores, -inf hides the key) and ``n_i`` = the number of visible keys:

    s_ij = scale * q_i . k_j (+ float attn_mask)
    w_ij = f(s_ij; n_i)                              the activation (``Sigmoid``, ``LengthScaledSoftplus``)
    u_ij = w_ij                                      or, with sharpening (power p, threshold tau):
    u_ij = relu(w_ij / Z_i - tau / n_i) ** p         Z_i = sum_j w_ij
    D_i  = 1 | n_i | sqrt(n_i) | sum_j u_ij          ``normalize``: none | count | sqrt_count | sum
    out_i = sum_j u_ij v_j / D_i                     a row with D_i = 0 (no visible key) is 0

Engines: ``blocksparse`` visits only the pattern's non-empty tiles (the tile machinery of
:mod:`attnkit.backends.blocksparse`); row statistics (``n``, ``Z``) take one extra pass each, and
the backward pass recomputes the tiles instead of storing weights, so memory is ``O(L x window)``
for a window pattern and no ``Lq x Lk`` tensor is built. ``dense`` builds the explicit matrices
(autograd differentiates them): small sizes and tests.

Backward of the tile engine (``go_i = dO_i / D_i``, ``delta_i = dO_i . out_i`` when D = sum u):

    dv_j  = sum_i u_ij go_i
    gu_ij = go_i . v_j - [D = sum u] delta_i / D_i
    gw_ij = gu_ij                                    or, with sharpening (A = w / Z, x = A - tau/n):
    gw_ij = (gu_ij p relu(x_ij)^(p-1) - E_i) / Z_i   E_i = sum_j gu_ij p relu(x_ij)^(p-1) A_ij
    ds_ij = gw_ij f'(s_ij; n_i);  dq_i = scale sum_j ds_ij k_j;  dk_j = scale sum_i ds_ij q_i
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..call import AttentionCall
from ..patterns.base import Pattern
from ..patterns.interval import IntervalPattern
from .blocksparse import _pad_blocks, _scores, _tile_mask, _Tiles, tiles_for

NORMALIZATIONS = ("none", "count", "sqrt_count", "sum")
MAX_DENSE_ELEMENTS = 1 << 28
QK_NORM_EPS = 1e-5


def softplus(x: torch.Tensor) -> torch.Tensor:
    """``log(1 + e^x)`` without overflow or a cut-off (``F.softplus`` returns x above 20)."""
    return torch.logaddexp(x, torch.zeros_like(x))


@dataclass(frozen=True)
class Sigmoid:
    """``f(s) = sigmoid(s + bias)``."""

    bias: float
    uses_counts = False

    def value(self, s, n):
        return torch.sigmoid(s + self.bias)

    def slope(self, s, n, w):
        return w * (1 - w)


@dataclass(frozen=True)
class LengthScaledSoftplus:
    """``f(s; n) = softplus(lam(n) s)`` with ``lam(n) = length_scale * log(n)`` (n >= 1)."""

    length_scale: float
    uses_counts = True

    def lam(self, n):
        return self.length_scale * torch.log(n.clamp_min(1))

    def value(self, s, n):
        return softplus(self.lam(n) * s)

    def slope(self, s, n, w):
        lam = self.lam(n)
        return lam * torch.sigmoid(lam * s)


@dataclass(frozen=True)
class ActivationSpec:
    """What the activation engines execute (see the module doc). ``sharpen`` is ``(power,
    threshold)`` or None and needs ``normalize="sum"``; ``qk_norm`` layer-normalises q and k over
    the head dimension (no learnable gain) before the scores."""

    pattern: Pattern
    activation: Any
    normalize: str = "none"
    sharpen: tuple[float, float] | None = None
    qk_norm: bool = False
    block: int = 128
    block_fixed: bool = True  # the methods' own block_size option (default 128) always applies

    def __post_init__(self) -> None:
        if self.normalize not in NORMALIZATIONS:
            raise ValueError(f"normalize={self.normalize!r} not in {NORMALIZATIONS}")
        if self.sharpen is not None and self.normalize != "sum":
            raise ValueError("sharpening re-weights a normalised row: it needs normalize='sum'")

    @property
    def needs_counts(self) -> bool:
        return (self.activation.uses_counts or self.normalize in ("count", "sqrt_count")
                or (self.sharpen is not None and self.sharpen[1] > 0))

    def describe(self) -> str:
        extra = f", sharpen={self.sharpen}" if self.sharpen else ""
        return f"{self.activation} on {self.pattern.describe()}, normalize={self.normalize}{extra}"


def prepared_inputs(call: AttentionCall, spec: ActivationSpec):
    """q, k, v in the working dtype (float64 stays, the rest compute in float32), k and v
    repeated to H heads, q and k layer-normalised when ``spec.qk_norm``."""
    wd = torch.float64 if call.dtype == torch.float64 else torch.float32
    k, v = call.expanded_kv()
    q, k, v = call.query.to(wd), k.to(wd), v.to(wd)
    if spec.qk_norm:
        q, k = qk_layer_norm(q), qk_layer_norm(k)
    return q, k, v


def qk_layer_norm(x: torch.Tensor) -> torch.Tensor:
    """LayerNorm over the head dimension without gain or bias (eps 1e-5, torch's default)."""
    return F.layer_norm(x, (x.shape[-1],), eps=QK_NORM_EPS)


def _divisor(spec: ActivationSpec, counts, sums):
    """D_i of the module doc (any shape); 0 marks a row that gives zeros."""
    if spec.normalize == "none":
        return None
    if spec.normalize == "count":
        return counts
    if spec.normalize == "sqrt_count":
        return counts.sqrt()
    return sums


def _safe(x):
    return torch.where(x > 0, x, torch.ones_like(x))


def _sharpened(spec: ActivationSpec, w, z, n):
    """``A = w / Z``, ``x = A - tau / n``, ``u = relu(x)^p`` and ``p relu(x)^(p-1)`` (0 where x <= 0)."""
    power, tau = spec.sharpen
    a = w / _safe(z)
    x = a - tau / n.clamp_min(1) if tau else a
    pos = x > 0
    xp = torch.where(pos, x, torch.ones_like(x))
    u = torch.where(pos, xp ** power, torch.zeros_like(x))
    du = torch.where(pos, power * xp ** (power - 1), torch.zeros_like(x))
    return a, u, du


# -- dense: explicit matrices ------------------------------------------------------------------
def dense_activation_attention(call: AttentionCall, spec: ActivationSpec) -> torch.Tensor:
    """The module doc's formula with ``(B, H, Lq, Lk)`` matrices; autograd differentiates it."""
    q, k, v = prepared_inputs(call, spec)
    s = (q @ k.transpose(-1, -2)) * call.scale
    keep = spec.pattern.dense(call.q_len, call.k_len, call.device)
    if call.attn_mask is not None:
        if call.attn_mask.dtype == torch.bool:
            keep = keep & call.attn_mask
        else:
            s = s + call.attn_mask.to(s.dtype)
    keep = keep & (s > float("-inf"))
    n = keep.sum(-1, keepdim=True).to(s.dtype)
    w = torch.where(keep, spec.activation.value(torch.where(keep, s, torch.zeros_like(s)), n),
                    torch.zeros_like(s))
    u = w
    if spec.sharpen is not None:
        _, u, _ = _sharpened(spec, w, w.sum(-1, keepdim=True), n)
    out = u @ v
    d = _divisor(spec, n, u.sum(-1, keepdim=True))
    if d is not None:
        out = torch.where(d > 0, out / _safe(d), torch.zeros_like(out))
    return out.to(call.dtype)


class DenseActivationEngine:
    """Explicit ``Lq x Lk`` matrices (tests, small sizes)."""

    name = "dense"

    def can_run(self, call: AttentionCall, spec: ActivationSpec) -> str | None:
        if call.dropout_p > 0:
            return "dropout is not implemented for activation attention"
        n = call.batch * call.heads * call.q_len * call.k_len
        if n > MAX_DENSE_ELEMENTS:
            return (f"would build {call.batch}x{call.heads}x{call.q_len}x{call.k_len} score matrices "
                    f"({n:,} elements > {MAX_DENSE_ELEMENTS:,}); use backend='blocksparse'")
        return None

    def run(self, call: AttentionCall, spec: ActivationSpec) -> torch.Tensor:
        return dense_activation_attention(call, spec)


# -- blocksparse: tiles, row statistics in extra passes, recomputing backward -------------------
def _visible(s, keep):
    """Keep mask broadcast to the scores, with keys hidden by a -inf float mask removed."""
    return keep & (s > float("-inf"))


def _tile_weights(spec: ActivationSpec, s, keep, n, z):
    """Per tile chunk: the visible mask, ``s`` with zeros at hidden pairs, ``w``, and (sharpening)
    ``A``, ``u`` and ``du/dA``. Row statistics ``n``, ``z`` are ``(B,H,C,bq)`` or None."""
    vis = _visible(s, keep)
    s0 = torch.where(vis, s, torch.zeros_like(s))
    nb = None if n is None else n[..., None, None]
    w = torch.where(vis, spec.activation.value(s0, nb), torch.zeros_like(s))
    if spec.sharpen is None:
        return vis, s0, nb, w, None, w, None
    a, u, du = _sharpened(spec, w, z[..., None, None], nb)
    return vis, s0, nb, w, a, u, du


def _row_counts(t: _Tiles, B, H, nQ, bq, dtype, device):
    """n_i: visible keys per query row ``(B, H, nQ, bq)``: from the interval bounds when the pattern
    is one interval per row and there is no mask, else from the tile masks (one pass, no scores)."""
    if isinstance(t.spec.pattern, IntervalPattern) and t.attn_mask is None:
        rows = torch.arange(nQ * bq, device=device).clamp(max=t.q_len - 1)
        lo, hi = t.spec.pattern._bounds(rows, t.params)
        n = (torch.clamp(torch.as_tensor(hi, device=device), max=t.k_len - 1)
             - torch.clamp(torch.as_tensor(lo, device=device), min=0) + 1).clamp(min=0)
        return n.to(dtype).expand(nQ * bq).reshape(1, 1, nQ, bq).expand(B, H, nQ, bq)
    counts = torch.zeros(B, H, nQ, bq, dtype=dtype, device=device)
    for c0, c1 in t.chunks():
        for m0, m1 in t.tile_chunks(c0, c1):
            keep, _, _, added = _tile_mask(t, c0, c1, m0, m1)
            if added is not None:
                keep = keep & (added > float("-inf"))
            keep = keep.expand(-1, -1, -1, bq, -1, -1)
            counts[:, :, c0:c1] += keep.sum(dim=(-2, -1)).to(dtype)
    return counts


def _row_sums(t: _Tiles, spec: ActivationSpec, qb, kb, n):
    """Z_i = sum_j w_ij ``(B, H, nQ, bq)``."""
    B, H, nQ, bq, _ = qb.shape
    z = torch.zeros(B, H, nQ, bq, dtype=qb.dtype, device=qb.device)
    for c0, c1 in t.chunks():
        nc = None if n is None else n[:, :, c0:c1]
        for m0, m1 in t.tile_chunks(c0, c1):
            s, keep, _, _ = _scores(t, qb, kb, c0, c1, m0, m1)
            z[:, :, c0:c1] += _weights_only(spec, s, keep, nc).sum(dim=(-2, -1))
    return z


def _weights_only(spec: ActivationSpec, s, keep, n):
    vis = _visible(s, keep)
    nb = None if n is None else n[..., None, None]
    return torch.where(vis, spec.activation.value(torch.where(vis, s, torch.zeros_like(s)), nb),
                       torch.zeros_like(s))


def _forward(t: _Tiles, spec: ActivationSpec, q, k, v):
    qb, kb, vb = _pad_blocks(q, t.block_q), _pad_blocks(k, t.block_k), _pad_blocks(v, t.block_k)
    B, H, nQ, bq, _ = qb.shape
    n = _row_counts(t, B, H, nQ, bq, q.dtype, q.device) if spec.needs_counts else None
    z = _row_sums(t, spec, qb, kb, n) if spec.sharpen is not None else None
    out = torch.zeros(B, H, nQ, bq, v.shape[-1], dtype=q.dtype, device=q.device)
    sums = torch.zeros(B, H, nQ, bq, dtype=q.dtype, device=q.device)
    for c0, c1 in t.chunks():
        nc = None if n is None else n[:, :, c0:c1]
        zc = None if z is None else z[:, :, c0:c1]
        acc = out[:, :, c0:c1].clone()
        for m0, m1 in t.tile_chunks(c0, c1):
            s, keep, idx, grid = _scores(t, qb, kb, c0, c1, m0, m1)
            u = _tile_weights(spec, s, keep, nc, zc)[5]
            vg = vb[grid[0][..., 0, 0], grid[1][..., 0, 0], idx]
            acc = acc + torch.einsum("bhcqmk,bhcmkd->bhcqd", u, vg)
            sums[:, :, c0:c1] += u.sum(dim=(-2, -1))
        out[:, :, c0:c1] = acc
    d = _divisor(spec, n, sums)
    if d is not None:
        out = torch.where((d > 0)[..., None], out / _safe(d)[..., None], torch.zeros_like(out))
    Lq = t.q_len
    return out.view(B, H, nQ * bq, -1)[:, :, :Lq], n, z, d


def _backward(t: _Tiles, spec: ActivationSpec, q, k, v, out, dout, n, z, d):
    wd = q.dtype
    qb, kb, vb = _pad_blocks(q, t.block_q), _pad_blocks(k, t.block_k), _pad_blocks(v, t.block_k)
    B, H, nQ, bq, D = qb.shape
    nK, bk = kb.shape[2], kb.shape[3]
    go = _pad_blocks(dout, t.block_q)
    if d is not None:
        inv = torch.where(d > 0, 1 / _safe(d), torch.zeros_like(d))
        go = go * inv[..., None]
    shift = None  # delta_i / D_i, for D = sum_j u_ij
    if spec.normalize == "sum":
        shift = _pad_blocks((dout * out).sum(-1, keepdim=True), t.block_q)[..., 0] * inv
    e = _sharpen_correction(t, spec, qb, kb, vb, go, shift, n, z) if spec.sharpen is not None else None
    dq = torch.zeros_like(qb)
    dk = torch.zeros(B * H * nK, bk, D, dtype=wd, device=q.device)
    dv = torch.zeros(B * H * nK, bk, v.shape[-1], dtype=wd, device=q.device)
    base = (torch.arange(B, device=q.device).view(B, 1, 1, 1) * H
            + torch.arange(H, device=q.device).view(1, H, 1, 1)) * nK
    for c0, c1 in t.chunks():
        nc = None if n is None else n[:, :, c0:c1]
        zc = None if z is None else z[:, :, c0:c1]
        g = go[:, :, c0:c1]
        for m0, m1 in t.tile_chunks(c0, c1):
            s, keep, idx, grid = _scores(t, qb, kb, c0, c1, m0, m1)
            vis, s0, nb, w, a, u, du = _tile_weights(spec, s, keep, nc, zc)
            bi, hi = grid[0][..., 0, 0], grid[1][..., 0, 0]
            kg, vg = kb[bi, hi, idx], vb[bi, hi, idx]
            gidx = (base + idx).reshape(-1)
            _accumulate(dv, gidx, torch.einsum("bhcqmk,bhcqd->bhcmkd", u, g).reshape(-1, bk, dv.shape[-1]))
            gu = torch.einsum("bhcqd,bhcmkd->bhcqmk", g, vg)
            if shift is not None:
                gu = gu - shift[:, :, c0:c1, :, None, None]
            if spec.sharpen is not None:
                gu = (gu * du - e[:, :, c0:c1, :, None, None]) / _safe(zc)[..., None, None]
            ds = torch.where(vis, gu * spec.activation.slope(s0, nb, w), torch.zeros_like(gu))
            dq[:, :, c0:c1] += torch.einsum("bhcqmk,bhcmkd->bhcqd", ds, kg) * t.scale
            _accumulate(dk, gidx, (torch.einsum("bhcqmk,bhcqd->bhcmkd", ds, qb[:, :, c0:c1]) * t.scale)
                        .reshape(-1, bk, D))
    Lq, Lk = t.q_len, t.k_len
    dq = dq.view(B, H, nQ * bq, D)[:, :, :Lq]
    dk = dk.view(B, H, nK * bk, D)[:, :, :Lk]
    dv = dv.view(B, H, nK * bk, -1)[:, :, :Lk]
    return dq, dk, dv


def _accumulate(dst, index, src):
    """``dst[index] += src`` with repeated indices summed. ``index_put_(accumulate=True)``, not
    ``index_add_``: torch 2.13's CPU ``index_add_`` along dim 0 hands even two 128x4 slices to the
    thread pool, which cost ~0.1 s per call on a loaded 2-core machine (index_put_: microseconds)."""
    dst.index_put_((index,), src, accumulate=True)


def _sharpen_correction(t: _Tiles, spec: ActivationSpec, qb, kb, vb, go, shift, n, z):
    """E_i = sum_j gu_ij du_ij A_ij, the row term of the sharpening's chain rule."""
    e = torch.zeros(qb.shape[:4], dtype=qb.dtype, device=qb.device)
    for c0, c1 in t.chunks():
        nc, zc = n[:, :, c0:c1] if n is not None else None, z[:, :, c0:c1]
        for m0, m1 in t.tile_chunks(c0, c1):
            s, keep, idx, grid = _scores(t, qb, kb, c0, c1, m0, m1)
            _, _, _, _, a, _, du = _tile_weights(spec, s, keep, nc, zc)
            vg = vb[grid[0][..., 0, 0], grid[1][..., 0, 0], idx]
            gu = torch.einsum("bhcqd,bhcmkd->bhcqmk", go[:, :, c0:c1], vg)
            if shift is not None:
                gu = gu - shift[:, :, c0:c1, :, None, None]
            e[:, :, c0:c1] += (gu * du * a).sum(dim=(-2, -1))
    return e


class _ActivationAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tiles: _Tiles, spec: ActivationSpec, q, k, v):
        with torch.no_grad():
            out, n, z, d = _forward(tiles, spec, q, k, v)
        ctx.tiles, ctx.spec = tiles, spec
        ctx.save_for_backward(q, k, v, out, *(x for x in (n, z, d) if x is not None))
        ctx.present = tuple(x is not None for x in (n, z, d))
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, *stats = ctx.saved_tensors
        it = iter(stats)
        n, z, d = (next(it) if present else None for present in ctx.present)
        with torch.no_grad():
            dq, dk, dv = _backward(ctx.tiles, ctx.spec, q, k, v, out, dout.to(q.dtype), n, z, d)
        return None, None, dq, dk, dv


def blocksparse_activation_attention(call: AttentionCall, spec: ActivationSpec) -> torch.Tensor:
    """Run ``spec`` over ``call`` visiting only the pattern's non-empty tiles."""
    q, k, v = prepared_inputs(call, spec)
    tiles = tiles_for(call, spec)
    return _ActivationAttention.apply(tiles, spec, q, k, v).to(call.dtype)


class BlockSparseActivationEngine:
    """Tiles of the block plan only; memory ``O(L x window)`` for window patterns."""

    name = "blocksparse"

    def can_run(self, call: AttentionCall, spec: ActivationSpec) -> str | None:
        if call.dropout_p > 0:
            return "dropout is not implemented for activation attention"
        if call.attn_mask is not None and call.attn_mask.requires_grad:
            return "attn_mask requires grad, which blocksparse does not differentiate (use backend='dense')"
        return None

    def run(self, call: AttentionCall, spec: ActivationSpec) -> torch.Tensor:
        return blocksparse_activation_attention(call, spec)


def row_counts_dense(q_len: int, k_len: int, is_causal: bool, device=None) -> torch.Tensor:
    """n_i for plain causal / noncausal attention (no pattern, no mask): ``(Lq,)`` float32."""
    i = torch.arange(q_len, device=device, dtype=torch.float32)
    if not is_causal:
        return torch.full_like(i, float(k_len))
    return (i + (k_len - q_len) + 1).clamp(0, k_len)


__all__ = ["ActivationSpec", "Sigmoid", "LengthScaledSoftplus", "softplus", "qk_layer_norm",
           "DenseActivationEngine", "BlockSparseActivationEngine", "prepared_inputs",
           "row_counts_dense"]
