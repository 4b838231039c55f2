"""Rotary position embedding (Su et al. 2021, RoFormer), rotate-half convention (as in GPT-NeoX/Llama)."""

from __future__ import annotations

import torch


def rope_angles(positions: torch.Tensor, dim: int, base: float = 10000.0):
    """cos, sin of shape ``(L, dim)`` for integer ``positions (L,)``; ``dim`` must be even."""
    inv = base ** (-torch.arange(0, dim, 2, dtype=torch.float64, device=positions.device) / dim)
    ang = positions.to(torch.float64)[:, None] * inv[None, :]
    ang = torch.cat([ang, ang], dim=-1)
    return ang.cos(), ang.sin()


def apply_rope(x: torch.Tensor, positions: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """Rotate ``x (B, H, L, D)`` by its absolute ``positions (L,)``."""
    cos, sin = rope_angles(positions, x.shape[-1], base)
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x * cos.to(x.dtype) + rotated * sin.to(x.dtype)).to(x.dtype)
