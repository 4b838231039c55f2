"""One benchmark case: a method at one pattern and size, made runnable.

Functional methods run through ``ak.attend`` (unit ``op``); methods of kind ``layer`` without a
functional form run through ``ak.nn.Attention(dim, heads, method=NAME, causal=..., cross=...)``
(unit ``layer``: the projections are part of what is timed, so they are compared with a dense
``ak.nn.Attention`` of the same size). ``prepare`` turns a case into inputs and callables, or
raises :class:`NotApplicable` with the reason the method cannot run it (recorded as ``n-a``).
Errors raised while the call runs are the method's failures (``fail``), or ``oom``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from ..call import CAUSAL_PATTERNS
from ..errors import AttnkitError, BackendUnavailableError
from ..registry import Method, get_method

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "float64": torch.float64}


class NotApplicable(Exception):
    """The method cannot run this case; the message says why (recorded as ``n-a``)."""


@dataclass(frozen=True)
class Shape:
    """Everything about a case's tensors except the lengths."""

    batch: int = 1
    heads: int = 4
    kv_heads: int = 4
    head_dim: int = 32
    dtype: str = "float32"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Case:
    method: str
    pattern: str
    q_len: int
    k_len: int
    shape: Shape = Shape()
    options: dict[str, Any] = field(default_factory=dict)
    backend: str = "auto"
    unit: str = "op"

    @property
    def causal(self) -> bool:
        return self.pattern in CAUSAL_PATTERNS

    def options_on(self, device) -> dict[str, Any]:
        """The options with tensor-valued ones (ids, embeddings) moved to ``device``."""
        return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in self.options.items()}

    @property
    def cross(self) -> bool:
        return self.pattern.endswith("cross")


def lengths(pattern: str, length: int) -> tuple[int, int]:
    """``(Lq, Lk)`` of a benchmark size: self ``(L, L)``; cross ``(L // 2, L)`` (queries attend to a
    memory twice their length; causal cross is bottom-right aligned)."""
    return (length, length) if pattern.endswith("self") else (max(1, length // 2), length)


def unit_of(impl: Method) -> str:
    """``layer`` for methods that only exist as a parametrized layer, else ``op``."""
    return "layer" if impl.info.kind == "layer" and not impl.engines() else "op"


def bench_options(impl: Method, q_len: int, k_len: int, density: float | None = None,
                  shape: Shape | None = None) -> dict[str, Any]:
    """The method's benchmark configuration (``Method.bench_options``); NotApplicable when the
    method has no density knob or cannot be configured for these lengths. Methods whose
    ``bench_options`` names ``heads`` / ``kv_heads`` / ``head_dim`` get them from ``shape``."""
    sizes = {} if shape is None else impl.shape_keywords(
        impl.bench_options, heads=shape.heads, kv_heads=shape.kv_heads, head_dim=shape.head_dim)
    try:
        opts = impl.bench_options(q_len, k_len, density, **sizes)
    except NotImplementedError as err:
        raise NotApplicable(str(err) or f"{impl.info.name} has no bench_options for density={density}") from None
    except AttnkitError as err:
        raise NotApplicable(f"bench_options({q_len}, {k_len}, density={density}): {err}") from None
    return dict(opts)


def make_case(name: str, pattern: str, length: int, shape: Shape, density: float | None = None,
              backend: str = "auto") -> Case:
    """The case for method ``name`` at a benchmark size, or NotApplicable."""
    impl = get_method(name)
    info = impl.info
    if pattern not in info.patterns:
        raise NotApplicable(f"{name} does not support {pattern} (supports: {', '.join(sorted(info.patterns))})")
    q_len, k_len = lengths(pattern, length)
    unit = unit_of(impl)
    if unit == "layer" and pattern == "causal-cross":
        raise NotApplicable("ak.nn.Attention has no causal cross-attention layer (a cross layer lets "
                            "every query see the whole context), so a layer-only method cannot run it")
    return Case(name, pattern, q_len, k_len, shape, bench_options(impl, q_len, k_len, density, shape), backend, unit)


# -- inputs and callables ------------------------------------------------------------------------
def op_inputs(case: Case, device, seed: int, grad: bool = False) -> tuple[torch.Tensor, ...]:
    """Gaussian ``q (B, H, Lq, D)``, ``k, v (B, Hkv, Lk, D)`` (or ``x``/``context`` for layers)."""
    s = case.shape
    gen = torch.Generator(device=device).manual_seed(seed)  # on the device: no host-side randn at large L
    dtype = DTYPES[s.dtype]
    if case.unit == "layer":
        dim = s.heads * s.head_dim
        shapes = [(s.batch, case.q_len, dim)] + ([(s.batch, case.k_len, dim)] if case.cross else [])
    else:
        shapes = [(s.batch, s.heads, case.q_len, s.head_dim), (s.batch, s.kv_heads, case.k_len, s.head_dim),
                  (s.batch, s.kv_heads, case.k_len, s.head_dim)]
    out = tuple(torch.randn(shape, generator=gen, device=device).to(dtype) for shape in shapes)
    for t in out:
        t.requires_grad_(grad)
    return out


@dataclass
class Runnable:
    """``forward(*inputs) -> Tensor``; ``params`` are the layer's trainable tensors (unit layer)."""

    forward: Callable[..., torch.Tensor]
    backend: str
    params: tuple[torch.Tensor, ...] = ()


def runnable(case: Case, device, inputs: tuple[torch.Tensor, ...], *, seed: int = 0) -> Runnable:
    """Check the case on ``inputs`` (errors here mean ``n-a``) and return what runs it."""
    if case.unit == "layer":
        return _layer(case, device, seed)
    from ..api import attend, explain

    kwargs = dict(is_causal=case.causal, enable_gqa=case.shape.kv_heads != case.shape.heads,
                  method=case.method, backend=case.backend, **case.options_on(device))
    try:
        why = explain(*inputs, **kwargs)
    except (AttnkitError, NotImplementedError) as err:
        raise NotApplicable(f"{type(err).__name__}: {err}") from None
    return Runnable(lambda q, k, v: attend(q, k, v, **kwargs), why.backend or case.backend)


def _layer(case: Case, device, seed: int) -> Runnable:
    from ..nn import Attention

    s = case.shape
    dim = s.heads * s.head_dim
    torch.manual_seed(seed)
    try:
        layer = Attention(dim, s.heads, kv_heads=s.kv_heads, head_dim=s.head_dim, method=case.method,
                          causal=case.causal, cross=case.cross, context_dim=dim if case.cross else None,
                          **case.options_on(device))
    except (AttnkitError, NotImplementedError) as err:
        raise NotApplicable(f"ak.nn.Attention({case.method!r}): {type(err).__name__}: {err}") from None
    layer = layer.to(device=device, dtype=DTYPES[s.dtype])
    if case.cross:
        return Runnable(lambda x, c: layer(x, context=c), "layer", tuple(layer.parameters()))
    return Runnable(lambda x: layer(x), "layer", tuple(layer.parameters()))


# -- outcomes ------------------------------------------------------------------------------------
def is_oom(err: BaseException) -> bool:
    if isinstance(err, MemoryError):
        return True
    oom = getattr(torch.cuda, "OutOfMemoryError", None)
    if oom is not None and isinstance(err, oom):
        return True
    text = str(err).lower()
    return isinstance(err, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text
                                              or "not enough memory" in text)


def outcome(err: BaseException) -> tuple[str, str]:
    """``(status, reason)`` for an exception raised while a case ran."""
    if getattr(err, "bench_status", None):  # already classified (the memory worker's reply)
        return err.bench_status, str(err)
    if is_oom(err):
        return "oom", f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"
    if isinstance(err, (NotApplicable, BackendUnavailableError)):
        return "n-a", str(err)
    first = str(err).splitlines()[0] if str(err) else ""
    return "fail", f"{type(err).__name__}: {first[:500]}"
