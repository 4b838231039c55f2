"""``attnkit check``: verify a method on this machine.

Exact methods are compared with the float64 oracle given the method's own mask/bias; other
methods' backends are compared with the method's reference form (and their distance from exact
attention is reported, not judged). Every claimed pattern, every backend that can run here,
float64 and float32, GQA, D = 48, a cross length that is not a multiple of any block.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .api import _dispatch, attend
from .call import PATTERNS
from .reference import reference
from .registry import get_method

TOLERANCE = {  # (exact?, dtype) -> max error relative to max |reference|
    (True, torch.float64): 1e-10, (True, torch.float32): 1e-5,
    (False, torch.float64): 1e-9, (False, torch.float32): 1e-4,
}


@dataclass
class CheckRow:
    method: str
    pattern: str
    backend: str
    dtype: str
    error: float | None
    tolerance: float | None
    ok: bool | None  # None: informational (distance from exact attention) or skipped
    note: str = ""


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    ref = ref.detach().to(torch.float64)
    scale = float(ref.abs().max()) or 1.0
    return float((out.detach().to(torch.float64) - ref).abs().max()) / scale


def _inputs(pattern: str, gen: torch.Generator, dtype, device):
    B, H, Hkv, D, Dv = 2, 4, 2, 48, 32
    lq, lk = (63, 63) if pattern.endswith("self") else (37, 63)
    q = torch.randn(B, H, lq, D, generator=gen, dtype=torch.float64)
    k = torch.randn(B, Hkv, lk, D, generator=gen, dtype=torch.float64)
    v = torch.randn(B, Hkv, lk, Dv, generator=gen, dtype=torch.float64)
    return [t.to(device) for t in (q, k, v)]


def check_method(name: str, *, seed: int = 0, configs: int = 2, device: str = "cpu") -> list[CheckRow]:
    impl = get_method(name)
    info = impl.info
    rows: list[CheckRow] = []
    if info.kind == "layer" and not impl.engines():
        return _check_layer(name, seed)
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    for pattern in PATTERNS:
        if pattern not in info.patterns:
            rows.append(CheckRow(name, pattern, "-", "-", None, None, None, "not supported"))
            continue
        causal = pattern.startswith("causal")
        for _ in range(configs):
            q, k, v = _inputs(pattern, gen, torch.float64, device)
            shape = impl.sample_shape_keywords(heads=q.shape[1], kv_heads=k.shape[1], head_dim=q.shape[3])
            opts = impl.sample_options(rng, q.shape[2], k.shape[2], **shape)
            args = (q, k, v, None, 0.0, causal, None, True, name, "auto", None, opts)
            _, call, _, why = _dispatch(*args)
            if info.kind == "exact":
                mask, bias = impl.oracle_inputs(call)
                truth = reference(q, k, v, mask=mask, bias=bias, scale=call.scale)
            else:
                truth = impl.reference(call).to(torch.float64)
                exact = reference(q, k, v, is_causal=causal)
                rows.append(CheckRow(name, pattern, "(distance from exact)", "float64",
                                     relative_error(truth, exact), None, None, _fmt(opts)))
            for engine, reason in why.candidates:
                for dtype in (torch.float64, torch.float32):
                    if reason is not None and "only when named" not in reason:
                        rows.append(CheckRow(name, pattern, engine, str(dtype)[6:], None, None, None,
                                             f"skipped: {reason}"))
                        break
                    out = attend(q.to(dtype), k.to(dtype), v.to(dtype), is_causal=causal, enable_gqa=True,
                                 method=name, backend=engine, **opts)
                    err = relative_error(out, truth)
                    tol = TOLERANCE[(info.kind == "exact", dtype)]
                    ok = err <= tol and not bool(torch.isnan(out).any())
                    rows.append(CheckRow(name, pattern, engine, str(dtype)[6:], err, tol, ok, _fmt(opts)))
    return rows


def _check_layer(name: str, seed: int) -> list[CheckRow]:
    """Layer methods: the full forward is finite; decoding (if claimed) equals it."""
    from .nn import Attention

    torch.manual_seed(seed)
    info = get_method(name).info
    rows = []
    causal = "causal-self" in info.patterns
    layer = Attention(32, 4, method=name, causal=causal).double()
    x = torch.randn(2, 17, 32, dtype=torch.float64)
    full = layer(x)
    rows.append(CheckRow(name, "causal-self" if causal else "noncausal-self", "layer forward", "float64",
                         None, None, bool(torch.isfinite(full).all()), "finite output"))
    if info.decode and causal:
        cache = layer.init_cache(2)
        steps = torch.cat([layer(x[:, t:t + 1], cache=cache) for t in range(x.shape[1])], 1)
        err = relative_error(steps, full)
        rows.append(CheckRow(name, "causal-self", "layer decode vs forward", "float64", err, 1e-9, err <= 1e-9))
    return rows


def _fmt(opts: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in opts.items())
