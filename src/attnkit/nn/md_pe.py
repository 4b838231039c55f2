"""LightNet's multi-dimensional relative position encodings (Qin et al., arXiv 2405.21022), as
layer parts for grids of tokens (images ``(H, W)``, videos ``(T, H, W)``) flattened row-major.

``MdLrpe`` (MD-LRPE, no parameters): the head dimension is split into one group per grid axis and
each group is rotated, RoPE-style, by the token's coordinate on that axis, so that
``lrpe(q, p) . lrpe(k, p')`` depends only on ``p - p'`` (per axis) — a relative encoding that keeps
linear attention linear. Channels left over when ``D`` is not a multiple of ``2 * axes`` are not
rotated; ``prefix`` leading special tokens (class tokens) get coordinate 0. In LightNet the rotation
is applied to q and to the *normalized* keys inside the recurrence: pass ``lrpe_grid`` to
``method="lightnet"`` for that; on its own this module rotates q and k of any kernel method.

``MdTpe`` (MD-TPE, parameters): per grid axis a Toeplitz mixer along that axis (other axes folded
into the batch) — per head a learned decay ``lam_h = sigmoid(w_h)`` and learned vectors ``q_h, k_h``:
``y_t = (q_h . k_h) sum_s lam_h^|t - s| x_s`` (``causal=True``: only ``s <= t``), computed by
``method="lightning"``, then a per-head RMSNorm and an output projection; the axes' outputs are
summed. In the author's LM it is applied once to the token embeddings.

Sources: Doraemonzzz/xmixers ``modules/pes/lrpe.py`` (rotary / cos-sin LRPE variants, base 10000),
``modules/pes/tpe.py`` (``q, k`` vectors of the embedding size, ``log_decay = logsigmoid(w)`` per
head, ``lightning_attn_func``, group RMSNorm, ``o_proj``) and ``modules/pes/md/md_tpe.py`` (one Tpe
per axis, folded with ``pack``, outputs summed). The official LightNet repository could not be
retrieved: the per-axis split of the head dimension for MD-LRPE, the RoPE frequencies
``base^(-2j / d_axis)`` and the symmetric ``lam^|t-s|`` of a noncausal MD-TPE are our choices
[UNVERIFIED against the paper's code].
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import ArgumentError, ShapeError
from .rope import apply_rope


def grid_coordinates(grid: tuple[int, ...], length: int, prefix: int = 0, device=None) -> torch.Tensor:
    """``(length, len(grid))`` integer coordinates of the tokens of a row-major grid; the first
    ``prefix`` tokens get 0 (special tokens). A 1-axis grid may be any length (positions 0, 1, ...)."""
    if len(grid) > 1 and length - prefix != math.prod(grid):
        raise ShapeError(f"a grid {tuple(grid)} holds {math.prod(grid)} tokens, but the sequence has "
                         f"{length - prefix} after {prefix} prefix tokens.")
    idx = torch.arange(max(0, length - prefix), device=device)
    coords = []
    for size in reversed(grid[1:]):
        coords.append(idx % size)
        idx = idx // size
    coords.append(idx)
    body = torch.stack(coords[::-1], -1)
    return torch.cat([body.new_zeros(prefix, len(grid)), body], 0)


class MdLrpe(nn.Module):
    """Rotate ``x (B, H, L, D)`` by the grid coordinates of its tokens (see the module docstring)."""

    def __init__(self, head_dim: int, axes: int, base: float = 10000.0):
        super().__init__()
        if axes < 1 or head_dim < 2 * axes:
            raise ArgumentError(f"MdLrpe needs head_dim >= 2 * axes (one rotated pair per axis); got "
                                f"head_dim={head_dim}, axes={axes}.")
        self.head_dim, self.axes, self.base = head_dim, axes, base
        self.group = head_dim // (2 * axes) * 2

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, axes={self.axes}, base={self.base}"

    def forward(self, x: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
        """``coords (L, axes)`` from :func:`grid_coordinates` (offset them for decoding)."""
        if coords.shape != (x.shape[2], self.axes):
            raise ShapeError(f"coords must be (L={x.shape[2]}, axes={self.axes}), got {tuple(coords.shape)}.")
        g = self.group
        parts = [apply_rope(x[..., a * g:(a + 1) * g], coords[:, a], self.base) for a in range(self.axes)]
        return torch.cat(parts + [x[..., self.axes * g:]], -1)


class Tpe(nn.Module):
    """One axis of MD-TPE on ``x (B, L, dim)``."""

    def __init__(self, dim: int, heads: int, causal: bool = True):
        super().__init__()
        if dim % heads:
            raise ShapeError(f"dim={dim} must be a multiple of heads={heads}.")
        self.heads, self.head_dim, self.causal = heads, dim // heads, causal
        self.q = nn.Parameter(torch.randn(dim) * dim ** -0.25)
        self.k = nn.Parameter(torch.randn(dim) * dim ** -0.25)
        self.decay_logit = nn.Parameter(torch.randn(heads))
        self.norm_weight = nn.Parameter(torch.ones(dim))
        self.o_proj = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from ..api import attend

        B, L, dim = x.shape
        H, d = self.heads, self.head_dim
        v = x.view(B, L, H, d).transpose(1, 2)
        q = self.q.to(x.dtype).view(1, H, 1, d).expand(B, H, L, d)
        k = self.k.to(x.dtype).view(1, H, 1, d).expand(B, H, L, d)
        slopes = -nn.functional.logsigmoid(self.decay_logit)
        y = attend(q, k, v, is_causal=self.causal, scale=1.0, method="lightning", slopes=slopes)
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + 1e-6)
        y = y.transpose(1, 2).reshape(B, L, dim) * self.norm_weight.to(x.dtype)
        return self.o_proj(y)


class MdTpe(nn.Module):
    """``sum_axis Tpe_axis(x)`` for ``x (B, L, dim)`` laid out on a row-major ``grid``."""

    def __init__(self, dim: int, heads: int, axes: int, causal: bool = True):
        super().__init__()
        self.tpes = nn.ModuleList(Tpe(dim, heads, causal) for _ in range(axes))

    def forward(self, x: torch.Tensor, grid: tuple[int, ...]) -> torch.Tensor:
        B, L, dim = x.shape
        if len(grid) != len(self.tpes) or math.prod(grid) != L:
            raise ShapeError(f"grid {tuple(grid)} must have {len(self.tpes)} axes holding L={L} tokens.")
        xg = x.view(B, *grid, dim)
        out = 0
        for axis, tpe in enumerate(self.tpes):
            moved = xg.movedim(axis + 1, -2)  # (B, ..., n_axis, dim)
            shape = moved.shape
            y = tpe(moved.reshape(-1, shape[-2], dim)).reshape(shape)
            out = out + y.movedim(-2, axis + 1).reshape(B, L, dim)
        return out
