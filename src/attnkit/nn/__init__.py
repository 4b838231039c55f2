"""Layers: ``Attention`` (any registered method), its decode cache, rotary positions, LightNet's
multi-dimensional position encodings."""

from .attention import Attention
from .cache import AttentionCache
from .md_pe import MdLrpe, MdTpe, grid_coordinates
from .rope import apply_rope

__all__ = ["Attention", "AttentionCache", "apply_rope", "MdLrpe", "MdTpe", "grid_coordinates"]
