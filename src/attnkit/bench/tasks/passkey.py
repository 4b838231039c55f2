"""S4 passkey retrieval over a length x depth grid: the token-level analogue of Mohtashami & Jaggi
(2023, arXiv 2305.16300, "Landmark Attention") and of RULER's single-needle task (Hsieh et al.
2024, arXiv 2404.06654), as suggested in research/benchmarks.md §3.6.

A sequence of ``length`` tokens: random filler tokens, a needle ``KEY d1 .. dk`` whose first token
sits at ``round(depth * (length - needle - query))`` (depth 0 = the start of the filler, 1 = just
before the query), and at the end the query ``QUERY d1 .. dk``: after ``QUERY`` the model must
produce the digits (teacher forced; each digit position is labelled). An example counts as right
when all ``k`` digits are. Models train at one length with random depths and are tested on the
grid.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

from .base import IGNORE, heads_for, predictions, train, train_examples

FILLER = 16
DIGITS = 10
KEY = FILLER + DIGITS
QUERY = KEY + 1
VOCAB = QUERY + 1


def generate(num_examples: int, length: int, digits: int, *, seed: int, depth: float | None = None):
    """``(inputs (N, length - 1), labels, needle_start (N,))``; ``depth=None`` draws it uniformly."""
    needle = 1 + digits
    room = length - 2 * needle
    if room < 0:
        raise ValueError(f"passkey length {length} is too short for a {digits}-digit needle and query")
    rng = np.random.default_rng(seed)
    seq = rng.integers(0, FILLER, size=(num_examples, length))
    key = rng.integers(0, DIGITS, size=(num_examples, digits)) + FILLER
    d = rng.random(num_examples) if depth is None else np.full(num_examples, depth)
    start = np.rint(d * room).astype(np.int64)
    rows = np.arange(num_examples)[:, None]
    seq[rows, start[:, None] + np.arange(needle)] = np.concatenate([np.full((num_examples, 1), KEY), key], 1)
    seq[:, length - needle:] = np.concatenate([np.full((num_examples, 1), QUERY), key], 1)
    labels = np.full((num_examples, length), IGNORE)
    labels[:, length - digits:] = key
    return torch.from_numpy(seq[:, :-1]), torch.from_numpy(labels[:, 1:]), torch.from_numpy(start)


@lru_cache(maxsize=64)
def _data(n: int, length: int, digits: int, seed: int, depth: float | None):
    return generate(n, length, digits, seed=seed, depth=depth)


def exact_match(pred: torch.Tensor, labels: torch.Tensor) -> float:
    """Share of examples whose every labelled position is right."""
    keep = labels != IGNORE
    right = ((pred == labels) | ~keep).all(-1)
    return float(right.double().mean())


class Passkey:
    name = "passkey"
    tier = "S4"
    pattern = "causal-self"
    title = "passkey retrieval: exact-match accuracy over length x depth"

    def train_len(self, scale) -> int:
        return scale.size["seq_len"] - 1

    def run(self, method, options, scale, width, lr, seed, device):
        from ...models import CausalLM

        s = scale.size
        x, y, _ = _data(train_examples(scale), s["seq_len"], s["digits"], 1000 + seed, None)
        torch.manual_seed(seed)
        model = CausalLM(VOCAB, dim=width, depth=2, heads=heads_for(width), method=method, **options).to(device)
        info = train(model, x, y, steps=scale.steps, batch=scale.batch, lr=lr, device=device, seed=seed)
        grid = {}
        for n in s["test_lens"]:
            for depth in s["depths"]:
                tx, ty, _ = _data(s["test"], n, s["digits"], 2000 + seed, float(depth))
                grid[f"{n}@{depth:g}"] = exact_match(predictions(model, tx, device, chunk=max(1, 2**16 // n)), ty)
        at_train = [v for k, v in grid.items() if k.startswith(f"{s['seq_len']}@")]
        return {"accuracy": float(np.mean(at_train)) if at_train else None, "grid": grid,
                "train_len": s["seq_len"], **info}
