"""Helpers shared by the approximate methods: working dtype, masked softmax that returns its
log-sum-exp, the log-sum-exp merge of attentions over disjoint key sets, seeded generators and
layer normalization without affine parameters.

Every helper keeps rows with no visible key at output 0 and log-sum-exp ``-inf`` with finite
gradients (no ``0 * inf``)."""

from __future__ import annotations

import torch

NEG_INF = float("-inf")


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other dtype computes in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def seeded(seed: int, stream: int) -> torch.Generator:
    """A CPU generator for random stream ``stream`` of a call with option ``seed``: draws do not
    depend on the device or on the order in which streams are used."""
    return torch.Generator().manual_seed((int(seed) * 1_000_003 + int(stream)) % (1 << 62))


def _safe(den: torch.Tensor) -> torch.Tensor:
    return torch.where(den > 0, den, torch.ones_like(den))


def masked_attention(scores: torch.Tensor, keep: torch.Tensor | None, value: torch.Tensor):
    """``softmax(scores over keep) @ value`` and its log-sum-exp.

    scores ``(..., Lq, Lk)``, keep bool broadcastable to it (None = all), value ``(..., Lk, Dv)``.
    Returns ``out (..., Lq, Dv)`` and ``lse (..., Lq)``; a row with nothing kept gives 0 / -inf."""
    if keep is not None:
        scores = scores.masked_fill(~keep, NEG_INF)
    m = scores.amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m)).detach()
    p = torch.exp(scores - m)
    den = p.sum(-1, keepdim=True)
    out = (p @ value) / _safe(den)
    lse = torch.where(den > 0, m + torch.log(_safe(den)), torch.full_like(den, NEG_INF))
    return out, lse.squeeze(-1)


def lse_merge(out1, lse1, out2, lse2):
    """Attention over the union of two disjoint key sets from the parts' outputs ``(..., Dv)`` and
    log-sum-exps ``(...)``: ``out = (e^l1 o1 + e^l2 o2) / (e^l1 + e^l2)``, ``lse = log(e^l1 + e^l2)``."""
    top = torch.maximum(lse1, lse2)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top)).detach()
    w1, w2 = torch.exp(lse1 - top), torch.exp(lse2 - top)
    total = w1 + w2
    out = (w1[..., None] * out1 + w2[..., None] * out2) / _safe(total)[..., None]
    lse = torch.where(total > 0, top + torch.log(_safe(total)), torch.full_like(total, NEG_INF))
    return out, lse


def layer_norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Layer normalization over the last dimension without scale or bias."""
    mean = x.mean(-1, keepdim=True)
    var = (x - mean).pow(2).mean(-1, keepdim=True)
    return (x - mean) * torch.rsqrt(var + eps)


def expand_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    """``(B, Hkv, ...)`` repeated to ``(B, heads, ...)`` (GQA: query head h uses kv head
    ``h // (heads // Hkv)``)."""
    return t if t.shape[1] == heads else t.repeat_interleave(heads // t.shape[1], dim=1)


def gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows of ``x (B, H, L, D)`` at ``index (B, H, ...)`` (values in ``[0, L)``) → ``(B, H, ..., D)``.

    One ``index_select`` over the flattened rows: the index stays one number per row (a ``gather``
    would expand it to every element, D times the memory traffic)."""
    B, H, L, D = x.shape
    base = (torch.arange(B * H, device=x.device) * L).view(B, H, *([1] * (index.dim() - 2)))
    flat = (base + index).reshape(-1)
    return x.reshape(B * H * L, D).index_select(0, flat).view(*index.shape, D)
