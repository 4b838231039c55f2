"""Shared pieces of the short training utilities of the trainable dynamic methods (seer's
``train_gate``, dma's ``train_bias``): finding the learned layer inside ``ak.nn.Attention``,
cycling the caller's batches and the loop that trains some of a layer's weights only."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator

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


def train_only(layer: torch.nn.Module, params: Iterable[torch.nn.Parameter], data, steps: int,
               optimizer: torch.optim.Optimizer, loss_of: Callable[[torch.Tensor], torch.Tensor]) -> list[float]:
    """``steps`` steps of ``optimizer`` (built on ``params``) on ``loss_of(x)`` for ``x`` cycled from
    ``data``; every other parameter of ``layer`` is frozen meanwhile and gets its ``requires_grad``
    back afterwards. Returns the loss of each step."""
    params = list(params)
    others = [p for p in layer.parameters() if all(p is not q for q in params)]
    saved = [p.requires_grad for p in others]
    for p in others:
        p.requires_grad_(False)
    batches, losses = cycled(data), []
    try:
        for _ in range(steps):
            loss = loss_of(next(batches))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
    finally:
        for p, r in zip(others, saved):
            p.requires_grad_(r)
    return losses
