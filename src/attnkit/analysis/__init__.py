"""Inspection tools: the implicit attention matrix of linear / recurrent methods (``materialize``)."""

from .materialize import materialize

__all__ = ["materialize"]
