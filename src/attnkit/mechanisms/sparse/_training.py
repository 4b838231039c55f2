"""Shared pieces of the short training utilities of the trainable dynamic methods (seer's
``train_gate``, dma's ``train_bias``): finding the learned layer inside ``ak.nn.Attention`` and
cycling the caller's batches."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import torch

from ...errors import ArgumentError


def learned_layer(layer, cls: type, method: str):
    """The ``cls`` instance ``layer`` is or wraps (``ak.nn.Attention(..., method=method,
    learned=True)`` keeps it as ``.inner``)."""
    inner = getattr(layer, "inner", layer)
    if not isinstance(inner, cls):
        raise ArgumentError(f"expected ak.nn.Attention(..., method={method!r}, learned=True) or a {cls.__name__}, "
                            f"got {type(layer).__name__} with inner {type(inner).__name__}.")
    return inner


def cycled(data) -> Iterator[torch.Tensor]:
    """``data`` (one ``x (B, L, dim)`` tensor or an iterable of them), repeated without end."""
    return itertools.cycle([data] if isinstance(data, torch.Tensor) else list(data))
