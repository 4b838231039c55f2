"""S1 MQAR: multi-query associative recall (Arora et al. 2023, "Zoology", arXiv 2312.04927).

Generator semantics confirmed against HazyResearch/zoology ``zoology/data/multiquery_ar.py``
(commit dbcb60d): keys come from ``[1, V/2)`` and values from ``[V/2, V)``, both drawn without
replacement inside an example; the context is ``k1 v1 k2 v2 ...`` (``2 * num_kv_pairs`` tokens); the
rest of the sequence is zeros into which every key is inserted once more, at even offsets
``2 * gap`` with gaps drawn without replacement from the power law ``p(g) ∝ a g^(a-1)``,
``g = 1..space``, ``space = (L - context) / 2``, ``a = power_a = 0.01``. The label at a query key's
position is its value (the next token); every other label is ``-100``. ``random_non_queries``
replaces the zeros with uniform random tokens (Zoology's default; its Figure 2 used False).
Constraints: ``L`` even, ``V > L``, ``4 * num_kv_pairs <= L``. Our own code (numpy Generator
instead of the global seed), same distribution.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from ...errors import ArgumentError
from .base import accuracy, heads_for, predictions, train

IGNORE = -100  # the label of every position that is not a query


@dataclass(frozen=True)
class MQARData:
    """``inputs (N, L)`` token ids and ``labels (N, L)`` (value at query positions, else -100)."""

    inputs: torch.Tensor
    labels: torch.Tensor


def generate(num_examples: int, seq_len: int, num_kv_pairs: int, vocab: int, *, seed: int,
             power_a: float = 0.01, random_non_queries: bool = False) -> MQARData:
    """Draw ``num_examples`` MQAR sequences of length ``seq_len`` (see the module docstring)."""
    if seq_len % 2:
        raise ArgumentError(f"MQAR seq_len={seq_len} must be even.")
    if vocab <= seq_len:
        raise ArgumentError(f"MQAR vocab={vocab} must exceed seq_len={seq_len}.")
    if 4 * num_kv_pairs > seq_len:
        raise ArgumentError(f"MQAR needs 4 * num_kv_pairs <= seq_len, got num_kv_pairs={num_kv_pairs}, "
                            f"seq_len={seq_len}.")
    rng = np.random.default_rng(seed)
    half = vocab // 2
    context = 2 * num_kv_pairs
    space = (seq_len - context) // 2
    keys = np.stack([rng.choice(np.arange(1, half), num_kv_pairs, replace=False) for _ in range(num_examples)])
    values = np.stack([rng.choice(np.arange(half, vocab), num_kv_pairs, replace=False)
                       for _ in range(num_examples)])
    p = power_a * np.arange(1, space + 1) ** (power_a - 1)
    p = p / p.sum()
    gaps = np.stack([rng.choice(space, num_kv_pairs, replace=False, p=p) for _ in range(num_examples)])
    inputs = np.zeros((num_examples, seq_len), dtype=np.int64)
    inputs[:, 0:context:2] = keys
    inputs[:, 1:context:2] = values
    labels = np.full((num_examples, seq_len), IGNORE, dtype=np.int64)
    rows = np.arange(num_examples)[:, None]
    query_pos = context + 2 * gaps
    inputs[rows, query_pos] = keys
    labels[rows, query_pos] = values
    if random_non_queries:
        filler = rng.integers(0, vocab, size=inputs.shape)
        inputs = np.where(inputs == 0, filler, inputs)
    return MQARData(torch.from_numpy(inputs), torch.from_numpy(labels))


@lru_cache(maxsize=8)
def _data(n: int, seq_len: int, kv: int, vocab: int, seed: int) -> MQARData:
    return generate(n, seq_len, kv, vocab, seed=seed)


class MQAR:
    """Train a 2-layer ``ak.models.CausalLM`` on MQAR; accuracy on the query positions of held-out
    sequences. ``size``: ``seq_len``, ``num_kv_pairs``, ``vocab``, ``train``, ``test``."""

    name = "mqar"
    tier = "S1"
    pattern = "causal-self"
    title = "MQAR accuracy on query positions"

    def train_len(self, scale) -> int:
        return scale.size["seq_len"]

    def run(self, method, options, scale, width, lr, seed, device):
        from ...models import CausalLM

        s = scale.size
        args = (s["seq_len"], s["num_kv_pairs"], s["vocab"])
        train_set = _data(s["train"], *args, seed=1000 + seed)
        test_set = _data(s["test"], *args, seed=2000 + seed)
        torch.manual_seed(seed)
        model = CausalLM(s["vocab"], dim=width, depth=2, heads=heads_for(width), method=method,
                         **options).to(device)
        info = train(model, train_set.inputs, train_set.labels, steps=scale.steps, batch=scale.batch, lr=lr,
                     device=device, seed=seed)
        acc = accuracy(predictions(model, test_set.inputs, device), test_set.labels)
        return {"accuracy": acc, "params": sum(p.numel() for p in model.parameters()), **info}
