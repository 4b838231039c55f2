"""SeerAttention's trainable part: the AttnGate, the layer that owns it, and its self-distillation.

``ak.nn.Attention(dim, heads, method="seer", learned=True, causal=True, rope=True)`` builds
:class:`SeerLayer`: projections, an :class:`AttnGate`, and ``ak.attend(method="seer",
gate_scores=...)`` on the gate's probabilities. :func:`train_gate` distils the gate with the base
weights frozen (the official post-training recipe)::

    q̃ = W_q ⊙ concat_f pool_f(q_pre)      pools over blocks of Bg tokens (ceil mode), per head
    k̃ = W_k ⊙ concat_f pool_f(k_pre)      W_q: (H, |q_pool|·D, F), W_k: (Hkv, |k_pool|·D, F)
    RoPE on q̃, k̃ at block positions 0, Bg, 2Bg, ... (rotary dim F), when the layer uses RoPE
    logits G = q̃ k̃ᵀ / sqrt(F)  (B, H, nq, nk); block-causal entries -1e9; probabilities softmax(G)
    target T[qb, kb] = max_{i in qb, j in kb} P[i, j],  P = softmax(q k ᵀ · scale, causal) of the
             frozen model (post-RoPE; masked entries 0), then each row divided by its sum
    loss     KLDivLoss(log_softmax(G), T), mean reduction, on query-block rows >= nq // 4

Confirmed in microsoft/SeerAttention @ aba03e3: ``seer_attn/prefill_sparse/attn_gate.py``
(``MultiHeadLinear`` einsum ``bshi,hio->bsho``; the q map skipped when one q pool, ``F == D`` and
not ``force_double``, the k map then per query head; pools ``max``, ``min = -max(-x)``, ``avg`` with
kernel = stride = block and ``ceil_mode=True``; RoPE then ``repeat_kv``; ``scale = F ** -0.5``;
bool masks filled with -1e9); ``modeling_llama_seerattn.py`` (gate on pre-RoPE q / k, block
positions ``position_ids[:, ::block]``, ``KLDivLoss()``, the first quarter of query blocks dropped,
``log_softmax`` of the gate logits); ``seer_attn/kernels/attn_pooling_kernel_2d.py`` (the target: the
row-wise block max of the softmax probabilities, causal entries at -1e6, then ``Po / Po.sum(-1)``);
``distillation_prefill.py`` / ``scripts/run_distillation_prefill.sh`` (only gate parameters train,
AdamW, lr 1e-3). Weights start ``normal(0, 0.02)`` (``_init_weights``). Differences: in training
mode the official layer outputs dense attention (the target is computed in the same kernel); here
the forward is always the gated sparse attention and the loss is a separate call
(``SeerLayer.gate_loss``); the target is computed in PyTorch in chunks of query blocks
(``O(L^2)`` time), not fused into FlashAttention.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ...errors import ArgumentError, ShapeError
from ...nn.rope import apply_rope
from ...patterns.plan import cdiv
from ._training import learned_layer, train_only
from .base import key_means, rows_per_chunk

MASKED = -1e9  # the official gate's fill value for masked blocks (finite: KL stays defined)
DEFAULT_HIDDEN = 128
DEFAULT_TYPE = "Qavg_Kmaxminavg"


def block_pool(x: torch.Tensor, block: int, kind: str) -> torch.Tensor:
    """``x (B, H, L, D)`` pooled over blocks of ``block`` tokens (partial last block: its tokens)."""
    if kind == "avg":
        return key_means(x, block).to(x.dtype)
    B, H, L, D = x.shape
    n = cdiv(L, block)
    fill = float("-inf") if kind == "max" else float("inf")
    padded = torch.nn.functional.pad(x, (0, 0, 0, n * block - L), value=fill).view(B, H, n, block, D)
    return padded.amax(3) if kind == "max" else padded.amin(3)


def parse_gate_type(name: str) -> tuple[list[str], list[str]]:
    """``"Qavg_Kmaxmin"`` -> (["avg"], ["max", "min"])."""
    q, k = name.split("_")
    split = lambda s: [p for p in ("max", "min", "avg") if p in s]  # noqa: E731
    return split(q[1:]), split(k[1:])


class MultiHeadLinear(nn.Module):
    """A bias-free linear map per head: ``x (B, h, n, in) -> (B, h, n, out)``."""

    def __init__(self, heads: int, features_in: int, features_out: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(heads, features_in, features_out).normal_(0.0, 0.02))

    def forward(self, x):
        if x.shape[1] < self.weight.shape[0]:
            x = x.repeat_interleave(self.weight.shape[0] // x.shape[1], dim=1)
        return torch.einsum("bhni,hio->bhno", x, self.weight.to(x.dtype))


class AttnGate(nn.Module):
    """Block gate logits ``(B, H, nq, nk)`` from pre-RoPE ``q (B, H, L, D)``, ``k (B, Hkv, L, D)``."""

    def __init__(self, heads: int, kv_heads: int, head_dim: int, block: int, hidden: int = DEFAULT_HIDDEN,
                 gate_type: str = DEFAULT_TYPE, force_double: bool = False):
        super().__init__()
        self.heads, self.kv_heads, self.block, self.hidden = heads, kv_heads, block, hidden
        self.q_pools, self.k_pools = parse_gate_type(gate_type)
        k_in = len(self.k_pools) * head_dim
        if len(self.q_pools) > 1 or hidden != head_dim or force_double:
            self.linear_q = MultiHeadLinear(heads, len(self.q_pools) * head_dim, hidden)
            self.linear_k = MultiHeadLinear(kv_heads, k_in, hidden)
        else:  # pooled queries used as they are; keys mapped per query head
            self.linear_q = None
            self.linear_k = MultiHeadLinear(heads, k_in, hidden)

    def forward(self, q, k, rope_base: float | None = None):
        qp = torch.cat([block_pool(q, self.block, f) for f in self.q_pools], -1)
        kp = torch.cat([block_pool(k, self.block, f) for f in self.k_pools], -1)
        if self.linear_q is not None:
            qp = self.linear_q(qp)
        kp = self.linear_k(kp)
        if rope_base is not None:
            if self.hidden % 2:
                raise ShapeError(f"seer's gate RoPE needs an even gate_hidden, got {self.hidden}.")
            qp = apply_rope(qp, torch.arange(qp.shape[2], device=q.device) * self.block, rope_base)
            kp = apply_rope(kp, torch.arange(kp.shape[2], device=k.device) * self.block, rope_base)
        if kp.shape[1] < qp.shape[1]:
            kp = kp.repeat_interleave(qp.shape[1] // kp.shape[1], dim=1)
        return (qp @ kp.transpose(-1, -2)) * self.hidden ** -0.5


def distillation_target(q: torch.Tensor, k: torch.Tensor, block: int, causal: bool, scale: float) -> torch.Tensor:
    """The official ground truth ``(B, H, nq, nk)``: the 2-D max-pool (blocks of ``block``) of the
    softmax probabilities of ``q (B, H, Lq, D)`` over ``k (B, Hkv, Lk, D)`` (bottom-right causal
    entries are 0), each row divided by its sum. Float32 / float64, no gradient; chunks of query
    blocks bound the memory."""
    with torch.no_grad():
        wd = torch.float64 if q.dtype == torch.float64 else torch.float32
        B, H, Lq, D = q.shape
        Hk, Lk = k.shape[1], k.shape[2]
        kk = k.to(wd).repeat_interleave(H // Hk, dim=1)
        nq, nk = cdiv(Lq, block), cdiv(Lk, block)
        out = torch.empty(B, H, nq, nk, dtype=wd, device=q.device)
        step = max(1, rows_per_chunk(B * H * Lk * block, q.device))
        cols = torch.arange(Lk, device=q.device)
        for c0 in range(0, nq, step):
            c1 = min(nq, c0 + step)
            r0, r1 = c0 * block, min(Lq, c1 * block)
            s = (q[:, :, r0:r1].to(wd) @ kk.transpose(-1, -2)) * scale
            if causal:
                rows = torch.arange(r0, r1, device=q.device)[:, None] + (Lk - Lq)
                s = s.masked_fill(cols > rows, float("-inf"))
            p = torch.softmax(s, -1).nan_to_num(0.0)  # rows that see nothing: 0
            p = torch.nn.functional.pad(p, (0, nk * block - Lk, 0, (c1 - c0) * block - (r1 - r0)))
            out[:, :, c0:c1] = p.view(B, H, c1 - c0, block, nk, block).amax(-1).amax(3)
        return out / out.sum(-1, keepdim=True).clamp_min(torch.finfo(wd).tiny)


class SeerLayer(nn.Module):
    """SeerAttention on ``x (B, L, dim)``: projections, the AttnGate, gated block-sparse attention."""

    def __init__(self, impl, *, dim, heads, kv_heads, head_dim, causal, cross, context_dim, rope=False,
                 rope_base=10000.0, bias=False, backend="auto", **options: Any):
        super().__init__()
        if cross:
            raise ArgumentError("method 'seer' with learned=True is a self-attention layer (the gate pools the "
                                "layer's own queries and keys); build it with cross=False.")
        opts = impl.info.options.validate(options, "seer")
        if opts["gate_scores"] is not None:
            raise ArgumentError("the learned seer layer computes gate_scores itself; do not pass gate_scores=.")
        self.impl, self.causal, self.backend = impl, causal, backend
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.rope_base = rope_base if rope else None
        self.block = opts["gate_block"]
        self.sparsity = {k: opts[k] for k in ("threshold", "nz_ratio", "density", "last_block_dense", "block_size")}
        self.q_proj = nn.Linear(dim, heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(dim, kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(dim, kv_heads * head_dim, bias=bias)
        self.o_proj = nn.Linear(heads * head_dim, dim, bias=bias)
        self.gate = AttnGate(heads, kv_heads, head_dim, self.block, opts["gate_hidden"] or DEFAULT_HIDDEN,
                             opts["gate_type"] or DEFAULT_TYPE)

    def init_cache(self, batch=None):
        raise ArgumentError("method 'seer' is a prefill method (decode=False): its gate scores whole query "
                            "blocks. Decode with another method, e.g. method='dense'.")

    def _heads(self, x, n):
        return x.view(x.shape[0], x.shape[1], n, self.head_dim).transpose(1, 2)

    def projections(self, x):
        """Pre-RoPE ``q (B, H, L, hd)``, ``k, v (B, Hkv, L, hd)``."""
        return self._heads(self.q_proj(x), self.heads), self._heads(self.k_proj(x), self.kv_heads), \
            self._heads(self.v_proj(x), self.kv_heads)

    def rotate(self, q, k):
        if self.rope_base is None:
            return q, k
        pos = torch.arange(q.shape[2], device=q.device)
        return apply_rope(q, pos, self.rope_base), apply_rope(k, pos, self.rope_base)

    def gate_logits(self, q, k):
        """Masked gate logits ``(B, H, nq, nk)`` from pre-RoPE ``q``, ``k``."""
        logits = self.gate(q, k, self.rope_base)
        if self.causal:
            nb = logits.shape[-1]
            future = torch.arange(nb, device=q.device) > torch.arange(nb, device=q.device)[:, None]
            logits = logits.masked_fill(future, MASKED)
        return logits

    def gate_scores(self, x):
        """The gate probabilities ``(B, H, nq, nk)`` for ``x`` (what the forward passes to ak.attend)."""
        q, k, _ = self.projections(x)
        return torch.softmax(self.gate_logits(q, k).float(), -1)

    def forward(self, x, context=None, cache=None):
        from ...api import attend

        if context is not None or cache is not None:
            raise ArgumentError("the learned seer layer takes neither context nor cache (self-attention prefill).")
        B, L, _ = x.shape
        q, k, v = self.projections(x)
        scores = torch.softmax(self.gate_logits(q, k).float(), -1).detach()
        q, k = self.rotate(q, k)
        out = attend(q, k, v, is_causal=self.causal, enable_gqa=self.heads != self.kv_heads, method="seer",
                     backend=self.backend, gate_scores=scores, gate_block=self.block, **self.sparsity)
        return self.o_proj(out.transpose(1, 2).reshape(B, L, -1))

    def gate_loss(self, x):
        """The distillation loss of the gate on ``x (B, L, dim)`` (only the gate gets gradients)."""
        with torch.no_grad():
            q, k, _ = self.projections(x)
            qr, kr = self.rotate(q, k)
            target = distillation_target(qr, kr, self.block, self.causal, self.head_dim ** -0.5)
        logits = self.gate_logits(q, k)
        first = logits.shape[2] // 4  # the first quarter of query blocks is dropped (official)
        logp = torch.log_softmax(logits[:, :, first:].float(), -1)
        t = target[:, :, first:].float()
        return (torch.xlogy(t, t) - t * logp).mean()  # KLDivLoss() with its default 'mean' reduction

    def selection(self, x, **sparsity):
        """``(Selection, q, k)``: the gate's selection on ``x`` with these sparsity options (default:
        the layer's), and the post-RoPE q / k it applies to (for ``Selection.recall``)."""
        from ...selection import select

        with torch.no_grad():
            q, k, _ = self.projections(x)
            scores = torch.softmax(self.gate_logits(q, k).float(), -1)
            qr, kr = self.rotate(q, k)
        opts = {k: v for k, v in self.sparsity.items() if k not in ("threshold", "nz_ratio", "density")}
        opts.update(sparsity or {k: self.sparsity[k] for k in ("threshold", "nz_ratio", "density")})
        sel = select(qr, kr, is_causal=self.causal, enable_gqa=self.heads != self.kv_heads, method="seer",
                     gate_scores=scores, gate_block=self.block, **opts)
        return sel, qr, kr


def seer_layer(layer) -> SeerLayer:
    """The SeerLayer inside ``layer`` (an ``ak.nn.Attention(..., method="seer", learned=True)``)."""
    return learned_layer(layer, SeerLayer, 'seer')


def train_gate(layer, data, steps: int = 100, lr: float = 1e-3) -> list[float]:
    """Distil the AttnGate of ``layer`` for ``steps`` AdamW steps (lr 1e-3, the official rate) on
    ``data``: one ``x (B, L, dim)`` tensor or an iterable of them (cycled). Every other weight stays
    frozen (and keeps its ``requires_grad``). Returns the loss of each step."""
    inner = seer_layer(layer)
    gate_params = list(inner.gate.parameters())
    return train_only(inner, gate_params, data, steps, torch.optim.AdamW(gate_params, lr=lr, weight_decay=0.0),
                      inner.gate_loss)


def gate_recall(layer, x, density: float) -> float:
    """Mean softmax-mass recall (``Selection.recall``) of the gate's top-``density`` blocks on ``x``."""
    sel, q, k = seer_layer(layer).selection(x, density=density)
    return float(sel.recall(q, k).mean())


__all__ = ["AttnGate", "SeerLayer", "distillation_target", "gate_recall", "train_gate"]
