"""F1 fidelity: how far a method's output is from exact attention on three input families.

Families (``q, k, v (B, H, L, D)``):

- ``gaussian``: independent standard normal entries.
- ``structured``: locality and attention sinks. ``q_i`` and ``k_j`` carry sinusoidal position
  features ``phi(i)`` with log-spaced frequencies, so ``q_i . k_j`` has a term
  ``sum_f cos(w_f (i - j))`` that peaks at ``i = j`` and decays with distance; every query and the
  first 4 keys share one direction ``u``, so those keys draw attention from every query (sinks,
  as in StreamingLLM, arXiv 2309.17453); plus standard normal content.
- ``captured``: per-layer q/k/v captured with forward hooks from a small ``ak.models.CausalLM``
  trained for a few seconds on MQAR (cached per run under ``OUT/cache``).

Metrics against exact attention (``ak.reference``, float64; SpargeAttn's ``precision_metric``
family): relative L1 ``sum|o - r| / sum|r|``, cosine similarity, RMSE, max abs error; for exact
methods also the kept share of (query, key) pairs and the softmax mass they keep: the dense softmax
probabilities summed over the keys in the method's ``oracle_inputs`` mask, averaged over queries.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from ..api import _dispatch, attend
from ..reference import causal_mask, reference
from ..registry import get_method
from .cases import Case, NotApplicable, lengths
from .ops import causal_share

FAMILIES = ("gaussian", "structured", "captured")
SINKS = 4


def gaussian(B: int, H: int, L: int, D: int, seed: int) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, H, L, D, generator=gen, dtype=torch.float64) for _ in range(3))


def structured(B: int, H: int, L: int, D: int, seed: int, peak: float = 8.0, sink: float = 6.0):
    """Locality + sinks (module docstring). ``peak``: the score of a query with itself from the
    position features; ``sink``: the score every query gives the first ``SINKS`` keys."""
    gen = torch.Generator().manual_seed(seed)
    half = D // 2
    freqs = torch.logspace(math.log10(1.0 / L), math.log10(0.5), half, dtype=torch.float64)
    ang = torch.arange(L, dtype=torch.float64)[:, None] * freqs[None, :]
    phi = torch.cat([ang.cos(), ang.sin()], dim=-1)                          # (L, 2*half)
    phi = torch.nn.functional.pad(phi, (0, D - 2 * half))
    alpha = math.sqrt(peak * math.sqrt(D) / half)                           # alpha^2 * half / sqrt(D) = peak
    u = torch.randn(D, generator=gen, dtype=torch.float64)
    u = u / u.norm()
    c = math.sqrt(sink * math.sqrt(D))                                      # c^2 / sqrt(D) = sink
    q = torch.randn(B, H, L, D, generator=gen, dtype=torch.float64) + alpha * phi + c * u
    k = torch.randn(B, H, L, D, generator=gen, dtype=torch.float64) + alpha * phi
    k[:, :, :SINKS] += c * u
    v = torch.randn(B, H, L, D, generator=gen, dtype=torch.float64)
    return q, k, v


def captured(cache_dir: Path | None, length: int, cfg, device, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """q/k/v ``(layers * B, H, length, D)`` of a small CausalLM trained on MQAR (cached)."""
    path = None if cache_dir is None else Path(cache_dir) / f"captured-L{length}-s{cfg.capture_steps}.pt"
    if path is not None and path.exists():
        return tuple(torch.load(path))
    from .capture import capture_qkv

    qkv = capture_qkv(length, steps=cfg.capture_steps, train_len=cfg.capture_len, device=device, seed=seed)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(qkv, path)
    return qkv


def family_inputs(family: str, cfg, cache_dir, device) -> tuple[torch.Tensor, ...]:
    """Self-attention inputs of one family at the F1 length, float64 on CPU."""
    s = cfg.shape
    if family == "gaussian":
        return gaussian(s.batch, s.heads, cfg.length, s.head_dim, seed=11)
    if family == "structured":
        return structured(s.batch, s.heads, cfg.length, s.head_dim, seed=12)
    return tuple(t.to(torch.float64) for t in captured(cache_dir, cfg.length, cfg, device))


def for_pattern(qkv: tuple[torch.Tensor, ...], pattern: str) -> tuple[torch.Tensor, ...]:
    """Cross patterns take the last ``Lq`` queries against every key (``lengths``)."""
    q, k, v = qkv
    q_len, _ = lengths(pattern, k.shape[2])
    return q[:, :, k.shape[2] - q_len:], k, v


def exact(q, k, v, causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact attention (float64) and its softmax probabilities ``(B, H, Lq, Lk)``."""
    s = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    if causal:
        s = s.masked_fill(~causal_mask(q.shape[2], k.shape[2], q.device), float("-inf"))
    p = torch.softmax(s, dim=-1)
    return reference(q, k, v, is_causal=causal), p


def compare(out: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    o, r = out.to(torch.float64).flatten(), ref.to(torch.float64).flatten()
    return {"rel_l1": float((o - r).abs().sum() / r.abs().sum().clamp_min(1e-300)),
            "cosine": float(torch.nn.functional.cosine_similarity(o, r, dim=0)),
            "rmse": float(((o - r) ** 2).mean().sqrt()), "max_abs": float((o - r).abs().max())}


def fidelity(case: Case, qkv, ref: tuple[torch.Tensor, torch.Tensor], device, dtype=torch.float32,
             seed: int = 0) -> tuple[str, dict[str, Any]]:
    """Run ``case`` on ``qkv`` (float64, CPU) in ``dtype`` on ``device``; compare with ``ref``."""
    impl = get_method(case.method)
    if case.unit == "layer":
        raise NotApplicable("a layer-only method has no functional form to run on given q/k/v")
    q, k, v = (t.to(device=device, dtype=dtype) for t in qkv)
    opts = case.options_on(device)
    kwargs = dict(is_causal=case.causal, enable_gqa=q.shape[1] != k.shape[1], method=case.method, **opts)
    try:
        _, call, _, why = _dispatch(q, k, v, None, 0.0, case.causal, None, q.shape[1] != k.shape[1],
                                    case.method, "auto", None, opts)
    except Exception as err:  # noqa: BLE001 - a refusal at validation is n-a, with its message
        raise NotApplicable(f"{type(err).__name__}: {err}") from None
    torch.manual_seed(seed)
    out = attend(q, k, v, **kwargs)
    exact_out, probs = ref
    metrics: dict[str, Any] = compare(out.cpu(), exact_out)
    if impl.info.kind == "exact":
        mask, _ = impl.oracle_inputs(call)
        if mask is None:
            metrics.update(mass=1.0, kept_share=causal_share(*probs.shape[-2:]) if case.causal else 1.0)
        else:
            keep = torch.broadcast_to(mask.cpu(), probs.shape)
            metrics["mass"] = float((probs * keep).sum(-1).mean())
            metrics["kept_share"] = float(keep.double().mean())
    return why.backend, metrics
