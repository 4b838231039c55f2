"""Layers: ``Attention`` (any registered method), its decode cache, rotary positions."""

from .attention import Attention
from .cache import AttentionCache
from .rope import apply_rope

__all__ = ["Attention", "AttentionCache", "apply_rope"]
