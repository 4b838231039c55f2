"""K1 operator speed, K2 peak memory and K3 efficiency length.

FLOPs follow FlashAttention's convention (``benchmarks/benchmark_flash_attention.py``): forward
``4 B H Lq Lk D`` for full attention, times the share of (query, key) pairs a method keeps (the
causal mask keeps about half; a window less), backward 2.5x forward. Effective TFLOP/s are
reported for exact methods only, whose kept share is known; for other methods it is undefined.
K3 is CAB's efficiency length (Shark-NLP/CAB ``scripts/efficiency_length``): dense fitted with a
quadratic in L, the method with a linear function (for time, without its shortest length), the
crossover is the largest positive root of the difference; beside it the measured crossover, the
shortest measured length from which the method stays cheaper than dense.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..api import _dispatch
from ..mechanisms.pattern_method import PatternMethod
from ..registry import get_method
from .cases import Case, op_inputs, runnable
from .timing import cuda_peak_mib, time_calls

MODES = ("fwd", "fwd+bwd")
MEMORY_MODES = ("fwd", "train")
DENSITY_LIMIT = 1 << 26  # largest B*H*Lq*Lk mask built to count a dynamic method's kept share


def callables(case: Case, device, mode: str, sets: int, seed: int = 0):
    """``(fn, arg_sets, backend)``: ``fn(*args)`` runs the forward (no autograd) or a training step
    (forward + gradients of every input and weight)."""
    grad = mode != "fwd"
    arg_sets = [op_inputs(case, device, seed + i, grad=grad) for i in range(sets)]
    run = runnable(case, device, arg_sets[0], seed=seed)
    if not grad:
        def forward(*args):
            with torch.no_grad():
                return run.forward(*args)
        return forward, arg_sets, run.backend
    gen = torch.Generator(device="cpu").manual_seed(seed + 1000)
    grad_out: list[torch.Tensor] = []  # drawn at the first call, in the output's shape

    def step(*args):
        out = run.forward(*args)
        if not grad_out:
            grad_out.append(torch.randn(out.shape, generator=gen).to(device=out.device, dtype=out.dtype))
        leaves = [t for t in (*args, *run.params) if t.requires_grad]
        return torch.autograd.grad(out, leaves, grad_out[0], allow_unused=True)
    return step, arg_sets, run.backend


# -- K1 ------------------------------------------------------------------------------------------
def speed(case: Case, device, mode: str, cfg) -> tuple[str, dict[str, Any]]:
    fn, arg_sets, backend = callables(case, device, mode, cfg.inputs)
    t = time_calls(fn, arg_sets, device=device, warmup=cfg.warmup, reps=cfg.reps, min_reps=cfg.min_reps,
                   case_s=cfg.case_s, call_limit_s=cfg.call_limit_s)
    metrics: dict[str, Any] = t.as_dict()
    kept = kept_share(case, device) if case.unit == "op" else None
    flops = attention_flops(case, mode, kept)
    metrics.update(kept_share=kept, flops=flops,
                   tflops=None if flops is None else flops / (t.median_ms * 1e-3) / 1e12)
    return backend, metrics


def attention_flops(case: Case, mode: str, kept: float | None) -> float | None:
    """Dense attention FLOPs times the kept share (None when the share is unknown)."""
    if kept is None:
        return None
    s = case.shape
    fwd = 4.0 * s.batch * s.heads * case.q_len * case.k_len * s.head_dim * kept
    return fwd * (3.5 if mode != "fwd" else 1.0)


def causal_share(q_len: int, k_len: int) -> float:
    """Share of the ``Lq x Lk`` pairs the bottom-right causal mask keeps."""
    i = np.arange(q_len)
    return float(np.clip(i + (k_len - q_len) + 1, 0, k_len).sum()) / (q_len * k_len)


def kept_share(case: Case, device) -> float | None:
    """Share of (query, key) pairs an exact method attends to; None for other methods."""
    impl = get_method(case.method)
    if impl.info.kind != "exact":
        return None
    if case.method == "dense":
        return causal_share(case.q_len, case.k_len) if case.causal else 1.0
    s = case.shape
    q, k, v = op_inputs(case, device, 0)
    impl, call, _, why = _dispatch(q, k, v, None, 0.0, case.causal, None, s.kv_heads != s.heads,
                                   case.method, case.backend, None, case.options_on(device))
    if isinstance(impl, PatternMethod) and hasattr(why.plan, "pattern"):
        return float(why.plan.pattern.density(case.q_len, case.k_len, device=device))
    if s.batch * s.heads * case.q_len * case.k_len > DENSITY_LIMIT:
        return None
    mask, _ = impl.oracle_inputs(call)
    if mask is None:
        return causal_share(case.q_len, case.k_len) if case.causal else 1.0
    full = torch.broadcast_to(mask, (s.batch, s.heads, case.q_len, case.k_len))
    return float(full.float().mean())


# -- K2 ------------------------------------------------------------------------------------------
def memory(case: Case, device, mode: str, worker=None) -> tuple[str, dict[str, Any]]:
    """Peak memory of the forward (``fwd``) or of a training step (``train``), in MiB."""
    if torch.device(device).type == "cuda":
        fn, arg_sets, backend = callables(case, device, "fwd" if mode == "fwd" else "fwd+bwd", 1)
        fn(*arg_sets[0])  # warm-up: one-time allocations (workspaces, caches) are not the method's
        peak = cuda_peak_mib(lambda: fn(*arg_sets[0]), device)
        return backend, {"peak_mib": peak, "how": "torch.cuda.max_memory_allocated delta"}
    return worker.measure(case, mode)


# -- K3 ------------------------------------------------------------------------------------------
def efficiency_length(lengths, dense, method, *, drop_first: bool) -> dict[str, Any]:
    """CAB's fitted crossover and the measured one for one quantity (time or memory)."""
    lengths = np.asarray(lengths, dtype=float)
    dense = np.asarray(dense, dtype=float)
    method = np.asarray(method, dtype=float)
    out: dict[str, Any] = {"lengths": lengths.tolist(), "dense": dense.tolist(), "method": method.tolist(),
                           "fit": None, "measured": None}
    cheaper = method < dense
    for i in range(len(lengths)):
        if cheaper[i:].all():
            out["measured"] = float(lengths[i])
            break
    if len(lengths) < 3:
        out["fit_note"] = f"{len(lengths)} lengths: the quadratic fit needs 3"
        return out
    a, b, c = np.polyfit(lengths, dense, 2)
    sel = slice(1, None) if drop_first and len(lengths) > 2 else slice(None)
    d, e = np.polyfit(lengths[sel], method[sel], 1)
    out["coef"] = {"dense": [a, b, c], "method": [d, e]}
    roots = np.roots([a, b - d, c - e])
    real = sorted(float(r.real) for r in roots if abs(r.imag) < 1e-9 and r.real > 0)
    if a <= 0:
        out["fit_note"] = "the dense fit is not convex (a <= 0): no crossover from the fit"
    elif real:
        out["fit"] = real[-1]
    else:
        out["fit"] = 0.0
        out["fit_note"] = "the fitted method curve is below dense at every length"
    return out
