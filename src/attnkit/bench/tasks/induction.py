"""S3 induction heads with length extrapolation (Olsson et al. 2022; the H3 / Mamba setting).

Generator semantics confirmed against HazyResearch/safari ``src/dataloaders/synthetics.py``
(``generate_induction_head``, commit 42f326e): ``vocab`` counts two special tokens (a trigger,
safari's copy prefix ``=>``, and an unused no-op), so the sequence draws ``vocab - 2`` ordinary
tokens uniformly; one position ``p`` in ``[0, L - 2)`` becomes the trigger, the token after it is
the one to remember; the sequence ends with the trigger again and the model must produce the
remembered token. Inputs are the ``L + 1`` tokens before the answer; only the last position is
labelled (safari's test labels; we also train on that position only, which at a small fixed budget
learns the circuit without spending gradient on unpredictable random tokens). Mamba (arXiv
2312.00752, Table 11) trains at 256 and tests at lengths up to 2^20; we test at ``test_lens``.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

from .base import IGNORE, accuracy, heads_for, predictions, train, train_examples


def generate(num_examples: int, seq_len: int, vocab: int, *, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``inputs (N, seq_len + 1)`` and ``labels`` (the remembered token at the last position only).
    Token ``vocab - 2`` is the trigger; ``vocab - 1`` is never used (safari's no-op)."""
    rng = np.random.default_rng(seed)
    trigger = vocab - 2
    seq = rng.integers(0, vocab - 2, size=(num_examples, seq_len))
    pos = rng.integers(0, seq_len - 2, size=num_examples)
    rows = np.arange(num_examples)
    seq[rows, pos] = trigger
    answer = seq[rows, pos + 1]
    inputs = np.concatenate([seq, np.full((num_examples, 1), trigger)], axis=1)
    labels = np.full(inputs.shape, IGNORE)
    labels[:, -1] = answer
    return torch.from_numpy(inputs), torch.from_numpy(labels)


@lru_cache(maxsize=16)
def _data(n: int, seq_len: int, vocab: int, seed: int):
    return generate(n, seq_len, vocab, seed=seed)


class Induction:
    """Train at ``seq_len``, test at every length of ``test_lens`` (accuracy of the answer)."""

    name = "induction"
    tier = "S3"
    pattern = "causal-self"
    title = "induction heads: accuracy vs test length (trained at one length)"

    def train_len(self, scale) -> int:
        return scale.size["seq_len"] + 1

    def run(self, method, options, scale, width, lr, seed, device):
        from ...models import CausalLM

        s = scale.size
        x, y = _data(train_examples(scale), s["seq_len"], s["vocab"], 1000 + seed)
        torch.manual_seed(seed)
        model = CausalLM(s["vocab"], dim=width, depth=2, heads=heads_for(width), method=method, **options).to(device)
        info = train(model, x, y, steps=scale.steps, batch=scale.batch, lr=lr, device=device, seed=seed)
        by_len = {}
        for n in s["test_lens"]:
            tx, ty = _data(s["test"], n, s["vocab"], 2000 + seed)
            by_len[str(n)] = accuracy(predictions(model, tx, device, chunk=max(1, 2**16 // n)), ty)
        return {"accuracy": by_len[str(s["seq_len"])] if str(s["seq_len"]) in by_len else None,
                "by_length": by_len, "train_len": s["seq_len"], **info}
