"""What every learned task shares: the interface, a fixed-budget training loop, accuracy.

A task (one module each in this package) has a ``name``, a ``tier``, the ``pattern`` its model's
attention uses, and ``run(method, options, scale, width, lr, seed, device) -> metrics``. Models
come from ``ak.models`` with ``method=``; every method, layer methods included, trains the same
way for the same number of steps (a fixed step budget, not a time cap, so accuracies compare).
"""

from __future__ import annotations

import time
from typing import Any, Protocol

import torch
import torch.nn.functional as F

IGNORE = -100


class Task(Protocol):
    name: str
    tier: str
    pattern: str
    title: str

    def run(self, method: str, options: dict[str, Any], scale, width: int, lr: float, seed: int,
            device) -> dict[str, Any]: ...

    def train_len(self, scale) -> int: ...


def train_examples(scale) -> int:
    """Size of a generated task's training set: one fresh example per sample the step budget draws
    (at least 4096). A fixed set of 4096 was memorized: dense attention on induction at 64 tokens,
    600 steps, reached 0.36 with it and 0.74 with fresh examples (2-core CPU, 2026-11-27)."""
    return max(4096, scale.steps * scale.batch)


def heads_for(width: int) -> int:
    """Attention heads of a task model: head dim 32 (at least one head)."""
    return max(1, width // 32)


def loss_of(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over labelled positions (``-100`` ignored); works for ``(B, L, V)`` LM logits
    and ``(B, C)`` class logits."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=IGNORE)


def train(model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor, *, steps: int, batch: int,
          lr: float, device, seed: int, warmup: int | None = None, weight_decay: float = 0.1) -> dict[str, Any]:
    """AdamW (betas 0.9/0.98, weight decay 0.1 as in Zoology) with a linear warm-up over 5% of the
    steps, then a constant ``lr`` (recall tasks learn in a sudden transition that a decaying rate
    delays past a small budget); batches drawn with replacement by a seeded generator."""
    warmup = max(1, steps // 20) if warmup is None else warmup
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=weight_decay)

    def factor(step: int) -> float:
        return min(1.0, (step + 1) / warmup)

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    start, cpu0 = time.perf_counter(), time.process_time()
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        idx = torch.randint(0, inputs.shape[0], (batch,), generator=gen)
        loss = loss_of(model(inputs[idx].to(device)), targets[idx].to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    return {"train_s": time.perf_counter() - start, "train_cpu_s": time.process_time() - cpu0,
            "final_loss": loss.item(), "steps": steps}


@torch.no_grad()
def predictions(model: torch.nn.Module, inputs: torch.Tensor, device, chunk: int = 256) -> torch.Tensor:
    """Argmax predictions, evaluated in chunks."""
    model.eval()
    return torch.cat([model(inputs[i:i + chunk].to(device)).argmax(-1).cpu()
                      for i in range(0, inputs.shape[0], chunk)])


def accuracy(pred: torch.Tensor, targets: torch.Tensor) -> float:
    """Share of labelled positions (targets != -100) predicted right."""
    keep = targets != IGNORE
    return float((pred[keep] == targets[keep]).double().mean()) if keep.any() else float("nan")
