"""Shared pieces of linear / recurrent methods: form engines and the recurrent-state protocol.

A recurrent method offers three forms as backends — ``chunked`` (the default), ``parallel``
(materializes the ``Lq x Lk`` map) and ``recurrent`` (one token at a time) — which agree to
rounding. For decoding it implements ``init_state`` and ``forward_state``: run a causal
self-attention chunk of any length from a state and return the new state, so stepping one token
at a time through ``ak.nn.Attention`` equals the full forward.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ...call import AttentionCall
from ...options import Option
from ...registry import Method


class FormEngine:
    """One computational form of a method (the method supplies the function)."""

    def __init__(self, name: str, fn: Callable[[AttentionCall], torch.Tensor],
                 can_run: Callable[[AttentionCall], str | None] | None = None):
        self.name, self._fn, self._can_run = name, fn, can_run

    def can_run(self, call: AttentionCall, plan: Any) -> str | None:
        return self._can_run(call) if self._can_run else None

    def run(self, call: AttentionCall, plan: Any) -> torch.Tensor:
        return self._fn(call)


def three_forms(chunked, parallel, recurrent) -> tuple[FormEngine, ...]:
    """The engines of a method's three forms, in backend order (``chunked`` first: the default)."""
    return (FormEngine("chunked", chunked), FormEngine("parallel", parallel), FormEngine("recurrent", recurrent))


CHUNK_SIZE = Option("chunk_size", "int", 64, "chunk length of the chunked form (performance knob)",
                    low=1, high=4096, tuning=True)
"""The ``chunk_size`` option of methods whose chunk length changes speed only, not results."""


class RecurrentMethod(Method):
    """Base for methods with a decode state."""

    def init_state(self, batch: int, heads: int, head_dim: int, value_dim: int, *, dtype, device,
                   options: dict[str, Any]) -> Any:
        raise NotImplementedError

    def forward_state(self, call: AttentionCall, state: Any) -> tuple[torch.Tensor, Any]:
        """Causal self-attention over a chunk (``Lq == Lk``) continuing from ``state``."""
        raise NotImplementedError


def causal_split(call: AttentionCall):
    """Bottom-right alignment for causal linear forms: returns ``(skip, prefix)`` where the first
    ``skip`` queries see no key (Lq > Lk) and the first ``prefix`` keys are visible to every
    query (Lk > Lq). The rest is an aligned causal problem of length ``min(Lq, Lk)``."""
    off = call.k_len - call.q_len
    return (max(0, -off), max(0, off))
