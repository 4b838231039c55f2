"""L1 ListOps (Nangia & Bowman 2018; the Long Range Arena version, Tay et al. 2020, arXiv 2011.04006).

Generator rules confirmed against google-research/long-range-arena ``lra_benchmarks/data/listops.py``
(commit 29833a1): a node at ``depth < max_depth`` is a leaf digit 0-9 with probability 0.75
(``VALUE_P = 0.25`` for an operator), at ``max_depth`` always a leaf; an operator node has
``randint(2, max_args)`` children (inclusive) and one of ``[MIN [MAX [MED [SM`` (``MED`` =
``int(np.median)``, ``SM`` = sum mod 10; ``FIRST``/``LAST`` are disabled there too) closed by ``]``;
the root has depth 1; the length counts a leaf as 1 and an operator as 2 + its children (the
pipeline drops the parentheses); trees are kept when ``min_length < length < max_length``
(strictly) and deduplicated. The label is the value, 10 classes. Our own code: trees are token
lists, drawn by a seeded ``random.Random``.
"""

from __future__ import annotations

import random
from functools import lru_cache

import numpy as np
import torch
from torch import nn

from .base import accuracy, heads_for, predictions, train

OPERATORS = ("[MIN", "[MAX", "[MED", "[SM")
END = "]"
VALUE_P = 0.25
TOKENS = ("<pad>", *OPERATORS, END, *(str(d) for d in range(10)))
TOKEN_ID = {t: i for i, t in enumerate(TOKENS)}
PAD = 0


def tree(rng: random.Random, depth: int, max_depth: int, max_args: int) -> list[str]:
    """One expression as tokens (LRA's ``generate_tree`` rules)."""
    r = rng.random() if depth < max_depth else 1.0
    if r > VALUE_P:
        return [str(rng.choice(range(10)))]
    children = [tree(rng, depth + 1, max_depth, max_args) for _ in range(rng.randint(2, max_args))]
    return [rng.choice(OPERATORS), *(t for c in children for t in c), END]


def value(tokens: list[str]) -> int:
    """Evaluate a token list (a stack machine, independent of the generator)."""
    stack: list[list] = [[]]
    for tok in tokens:
        if tok in OPERATORS:
            stack.append([tok])
        elif tok == END:
            op, *args = stack.pop()
            result = {"[MIN": min, "[MAX": max, "[MED": lambda a: int(np.median(a)),
                      "[SM": lambda a: sum(a) % 10}[op](args)
            stack[-1].append(result)
        else:
            stack[-1].append(int(tok))
    (result,) = stack[0]
    return result


def generate(num_examples: int, *, max_depth: int, max_args: int, min_length: int, max_length: int,
             seed: int) -> list[tuple[tuple[str, ...], int]]:
    """Distinct expressions with ``min_length < len < max_length`` and their values."""
    rng = random.Random(seed)
    seen: dict[tuple[str, ...], int] = {}
    while len(seen) < num_examples:
        t = tuple(tree(rng, 1, max_depth, max_args))
        if min_length < len(t) < max_length and t not in seen:
            seen[t] = value(list(t))
    return list(seen.items())


def encode(examples: list[tuple[tuple[str, ...], int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids padded with ``PAD`` to the longest example, and the labels."""
    width = max(len(t) for t, _ in examples)
    ids = torch.full((len(examples), width), PAD, dtype=torch.long)
    for i, (t, _) in enumerate(examples):
        ids[i, : len(t)] = torch.tensor([TOKEN_ID[x] for x in t])
    return ids, torch.tensor([v for _, v in examples])


@lru_cache(maxsize=4)
def _data(n_train: int, n_test: int, max_depth: int, max_args: int, min_length: int, max_length: int, seed: int):
    every = generate(n_train + n_test, max_depth=max_depth, max_args=max_args, min_length=min_length,
                     max_length=max_length, seed=seed)
    return encode(every[:n_train]), encode(every[n_train:])


class _Classifier(nn.Module):
    """``EncoderClassifier`` that masks the padding itself (so the training loop stays generic)."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.encoder(tokens, tokens != PAD)


class ListOps:
    name = "listops"
    tier = "L1"
    pattern = "noncausal-self"
    title = "ListOps accuracy (10 classes)"

    def train_len(self, scale) -> int:
        return scale.size["max_length"]

    def run(self, method, options, scale, width, lr, seed, device):
        from ...models import EncoderClassifier

        s = scale.size
        (x, y), (tx, ty) = _data(s["train"], s["test"], s["max_depth"], s["max_args"], s["min_length"],
                                 s["max_length"], 1000 + seed)
        torch.manual_seed(seed)
        enc = EncoderClassifier(len(TOKENS), 10, dim=width, depth=2, heads=heads_for(width),
                                max_len=max(x.shape[1], tx.shape[1]), method=method, **options)
        model = _Classifier(enc).to(device)
        info = train(model, x, y, steps=scale.steps, batch=scale.batch, lr=lr, device=device, seed=seed)
        acc = accuracy(predictions(model, tx, device), ty)
        majority = float(torch.bincount(ty, minlength=10).max()) / len(ty)
        return {"accuracy": acc, "majority": majority, "seq_len": int(x.shape[1]), **info}
