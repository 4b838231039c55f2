"""Shared test helpers: random inputs, the truth for any method, relative errors."""

from __future__ import annotations

import os

import numpy as np
import torch

import attnkit as ak
from attnkit.api import _dispatch
from attnkit.registry import get_method


def inputs(B=2, H=4, Hkv=2, Lq=63, Lk=None, D=48, Dv=None, dtype=torch.float64, seed=0, grad=False):
    Lk = Lq if Lk is None else Lk
    Dv = D if Dv is None else Dv
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, Lq, D, generator=g, dtype=torch.float64).to(dtype)
    k = torch.randn(B, Hkv, Lk, D, generator=g, dtype=torch.float64).to(dtype)
    v = torch.randn(B, Hkv, Lk, Dv, generator=g, dtype=torch.float64).to(dtype)
    if grad:
        for t in (q, k, v):
            t.requires_grad_()
    return q, k, v


def shape_for(pattern: str, Lq: int, Lk: int) -> tuple[int, int]:
    """Lengths that realize ``pattern`` (self: Lq == Lk; cross: different lengths)."""
    if pattern.endswith("self"):
        return Lq, Lq
    return (Lq, Lk) if Lq != Lk else (Lq, Lk + 5)


def truth(name: str, q, k, v, *, is_causal: bool, attn_mask=None, **opts) -> torch.Tensor:
    """The float64 answer: the oracle with the method's mask (exact methods) or the method's
    reference form (others), computed from float64 copies of the inputs."""
    q64, k64, v64 = (t.detach().to(torch.float64) for t in (q, k, v))
    m64 = attn_mask if attn_mask is None or attn_mask.dtype == torch.bool else attn_mask.to(torch.float64)
    impl, call, _, _ = _dispatch(q64, k64, v64, m64, 0.0, is_causal, None, q.shape[1] != k.shape[1],
                                 name, "auto", None, opts)
    if impl.info.kind == "exact":
        mask, bias = impl.oracle_inputs(call)
        return ak.reference(q64, k64, v64, mask=mask, bias=bias, scale=call.scale)
    return impl.reference(call).to(torch.float64)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    ref = ref.detach().to(torch.float64)
    return float((out.detach().to(torch.float64) - ref).abs().max()) / (float(ref.abs().max()) or 1.0)


# Inputs of the oracle sweeps are N(0, 1), so gradient entries are O(1) unless they cancel: a row that
# sees one key has ds = p (dp - delta) = 0 exactly, which the FlashAttention-form backward
# (delta = rowsum(dO * O), engines blocksparse and flex) reaches only to float32 rounding, ~1e-6 at
# these sizes. Slow-sweep examples of 2026-11-27: frame_causal at L = 2 (seed 308), dk = +-0.0175 off
# by 3.1e-7; a 1x1x1 neighbourhood (dk = 0) off by 1.1e-6. Gradients are measured against
# max(|ref|, GRAD_FLOOR), the inputs' scale, instead of their own size.
GRAD_FLOOR = 1.0


def grad_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    """``rel_err`` for gradients of the N(0, 1) sweeps: relative to ``max(|ref|, GRAD_FLOOR)``."""
    ref = ref.detach().to(torch.float64)
    return float((got.detach().to(torch.float64) - ref).abs().max()) / max(float(ref.abs().max()), GRAD_FLOOR)


def functional_methods():
    """Names of registered methods callable through ak.attend."""
    return [i.name for i in ak.methods() if get_method(i.name).engines()]


# Engines that compile a kernel on first use (``compiles = True``, e.g. flex: ~25 s per kernel on
# CPU) run in the generic tests only when ATTNKIT_TEST_COMPILED=1; their own test files cover them.
TEST_COMPILED = os.environ.get("ATTNKIT_TEST_COMPILED", "0") not in ("", "0")


def runnable_backends(name, q, k, v, is_causal, **opts):
    why = ak.explain(q, k, v, is_causal=is_causal, enable_gqa=q.shape[1] != k.shape[1], method=name, **opts)
    heavy = set() if TEST_COMPILED else {e.name for e in get_method(name).engines() if getattr(e, "compiles", False)}
    return [n for n, r in why.candidates if (r is None or "only when named" in r) and n not in heavy]


def sample(name: str, seed: int, Lq: int, Lk: int, **shape: int) -> dict:
    """Random options of ``name`` for these lengths; ``shape`` (heads, kv_heads, head_dim) reaches
    methods whose ``sample_options`` asks for it."""
    impl = get_method(name)
    return impl.sample_options(np.random.default_rng(seed), Lq, Lk, **impl.sample_shape_keywords(**shape))
