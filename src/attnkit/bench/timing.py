"""Timing and peak memory of one callable, the same way for every method.

Speed: warm-up calls excluded; input sets rotated across repeats (no cache-warm reruns of one input);
each repeat synchronized on CUDA; median and p20/p80 reported (the flash-linear-attention
convention). A slow call gets fewer repeats (never fewer than ``min_reps``), so one slow method
cannot eat the budget of the others; the number of repeats is recorded.
Memory on CUDA: ``max_memory_allocated`` minus what was allocated before the call (inputs and
weights excluded, the output included). CPU memory is measured in a separate process
(``attnkit.bench.memory``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch


def synchronizer(device) -> Callable[[], None]:
    dev = torch.device(device)
    if dev.type == "cuda":
        return lambda: torch.cuda.synchronize(dev)
    return lambda: None


class TooSlow(Exception):
    """A single call exceeded the preset's per-call limit."""


@dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    reps: int

    def as_dict(self) -> dict[str, float | int]:
        return {"median_ms": self.median_ms, "p20_ms": self.p20_ms, "p80_ms": self.p80_ms, "reps": self.reps}


def time_calls(fn: Callable[..., object], arg_sets: Sequence[tuple], *, device, warmup: int, reps: int,
               min_reps: int, case_s: float, call_limit_s: float) -> Timing:
    """Time ``fn(*arg_sets[i % n])`` after ``max(2, warmup)`` warm-up calls. Raises TooSlow when the
    faster of the first two calls takes longer than ``call_limit_s``."""
    sync = synchronizer(device)
    n = len(arg_sets)
    calls = []
    for i in range(max(2, warmup)):
        sync()
        t0 = time.perf_counter()
        fn(*arg_sets[i % n])
        sync()
        calls.append(time.perf_counter() - t0)
        if i >= 1 and min(calls) > call_limit_s:  # the first call may carry one-time set-up
            raise TooSlow(f"one call took {min(calls):.2f} s, over the preset's per-call limit of {call_limit_s} s")
    fastest = min(calls)
    reps = max(min_reps, min(reps, int(case_s / max(fastest, 1e-9))))
    warmup = len(calls)
    times = []
    for i in range(reps):
        args = arg_sets[(warmup + i) % n]
        sync()
        t0 = time.perf_counter()
        fn(*args)
        sync()
        times.append(time.perf_counter() - t0)
    ms = np.asarray(times) * 1e3
    return Timing(float(np.median(ms)), float(np.percentile(ms, 20)), float(np.percentile(ms, 80)), reps)


def cuda_peak_mib(fn: Callable[[], object], device) -> float:
    """Peak CUDA memory allocated by ``fn()`` beyond what was allocated before, in MiB."""
    dev = torch.device(device)
    torch.cuda.synchronize(dev)
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    out = fn()
    torch.cuda.synchronize(dev)
    peak = torch.cuda.max_memory_allocated(dev)
    del out
    return (peak - base) / 2**20
