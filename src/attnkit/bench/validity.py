"""F2 pattern validity: CAB's causal-leak test for every causal pattern a method claims.

CAB (Shark-NLP/CAB ``scripts/attention_pattern/test_available_pattern_for_attention.py``) reruns a
causal model on prefixes and fails when an earlier output changes. We use the equivalent
perturbation form (the same as ``tests/test_registry.py::test_causal_leak``): replace every query,
key and value after position ``t`` with new random values (keys and values bottom-right aligned,
so key ``j`` is "after" query ``t`` when ``j > t + Lk - Lq``) and require the outputs up to ``t`` to
stay the same, for ``t`` at the start, the middle and the end, in float64 (a leak shows as a
change above ``rel_tol`` of the output's scale). Layer-only methods are tested through
``ak.nn.Attention`` on ``x (B, L, dim)``. Noncausal patterns have no leak to test; as in CAB they
pass when the call runs.
"""

from __future__ import annotations

from typing import Any

import torch

from .cases import Case, op_inputs, runnable


def leak_test(case: Case, device, rel_tol: float, seed: int = 0) -> tuple[str, dict[str, Any]]:
    inputs = op_inputs(case, device, seed)
    run = runnable(case, device, inputs, seed=seed)
    torch.manual_seed(seed)
    base = run.forward(*inputs).detach()
    if not case.causal:
        return run.backend, {"pass": bool(torch.isfinite(base).all()), "check": "runs (noncausal)"}
    layer = case.unit == "layer"
    gen = torch.Generator(device="cpu").manual_seed(seed + 7)
    offset = case.k_len - case.q_len
    scale = float(base.abs().max()) or 1.0
    worst = 0.0
    for t in sorted({0, case.q_len // 2, case.q_len - 2} & set(range(case.q_len - 1))):
        changed = [x.detach().clone() for x in inputs]
        for i, x in enumerate(changed):
            is_query = i == 0
            start = t + 1 if is_query or layer else t + 1 + offset
            axis = 1 if layer else 2
            tail = x.narrow(axis, start, x.shape[axis] - start) if start < x.shape[axis] else None
            if tail is not None:
                tail.copy_(torch.randn(tail.shape, generator=gen).to(tail) * 3)
        torch.manual_seed(seed)
        out = run.forward(*changed).detach()
        head = out[:, : t + 1] if layer else out[:, :, : t + 1]
        ref = base[:, : t + 1] if layer else base[:, :, : t + 1]
        worst = max(worst, float((head - ref).abs().max()) / scale)
    return run.backend, {"pass": worst <= rel_tol, "max_rel_change": worst, "rel_tol": rel_tol,
                         "check": "perturb the future, earlier outputs unchanged"}
