"""The method registry: one decorator per method module, lookups by name.

This module imports nothing heavy. The method modules register themselves when
``attnkit.mechanisms`` is imported, which happens on the first lookup.

The benchmark hook. ``attnkit bench`` runs every registered method with the options returned by
``Method.bench_options(q_len, k_len, density=None)``:

- it is called once per benchmark size with the call's query and key lengths (self-attention:
  ``q_len == k_len``; cross: they differ; task models: the training length for both) and must be
  deterministic (no randomness: the same arguments give the same dict);
- it returns only what differs from the declared defaults or is required (``sliding_window`` needs a
  ``window``, grid methods a ``grid`` whose product is the length); ``{}`` (the default) means the
  method's defaults; the options are validated like a user's;
- ``density`` in ``(0, 1]``, when given, asks for that share of the ``q_len x k_len`` (query, key)
  pairs to be kept (the convention of ``Pattern.density`` and of the FLOP count: dense causal is
  about 0.5), for the fidelity-vs-density sweep; a method with a sparsity knob (window, top-k,
  blocks kept) maps it to that knob as closely as it can (the benchmark measures and reports the
  density actually reached); a method without one raises ``NotImplementedError`` (the base class
  does), and the benchmark records the sweep as ``n-a``;
- a method that cannot be configured for these lengths raises ``OptionError`` saying why; the
  benchmark records that size as ``n-a`` with the message.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from .call import ALL_PATTERNS, PATTERNS
from .errors import UnknownMethodError, did_you_mean
from .options import Option, OptionSet

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np
    import torch

    from .call import AttentionCall

FAMILIES = {
    "P": "exact structured sparsity",
    "D": "dynamic sparsity",
    "A": "approximation",
    "R": "linear / recurrent / memory",
    "N": "softmax alternative / head mixing",
    "T": "analysis",
    "B": "benchmark",
}
KINDS = ("exact", "approximate", "layer")


@dataclass(frozen=True)
class MethodInfo:
    """What a method is and what it accepts (see ``attnkit info NAME``).

    kind: ``exact`` (equals the oracle with some mask / bias), ``approximate``, or ``layer``
    (owns parameters; used through ``ak.nn``). ``patterns`` is a subset of
    ``{noncausal, causal} x {self, cross}``. ``backends`` lists the engines that can run it, in the
    order ``backend="auto"`` tries them. ``state_size`` describes the decode state of recurrent
    methods (per batch element and head).
    """

    name: str
    family: str
    summary: str
    kind: str
    patterns: frozenset[str]
    options: OptionSet = field(default_factory=OptionSet)
    seed: tuple[int, ...] = ()
    decode: bool = False
    backends: tuple[str, ...] = ()
    state_size: str | None = None
    accepts_mask: bool = False
    dropout: bool = False
    references: str = ""
    layer_settings: frozenset[str] = frozenset()  # ak.nn.Attention settings a layer method takes

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"{self.name}: family {self.family!r} not in {sorted(FAMILIES)}")
        if self.kind not in KINDS:
            raise ValueError(f"{self.name}: kind {self.kind!r} not in {KINDS}")
        bad = set(self.patterns) - ALL_PATTERNS
        if bad:
            raise ValueError(f"{self.name}: unknown patterns {sorted(bad)}; use {PATTERNS}")

    @property
    def option_names(self) -> list[str]:
        return self.options.names()

    def supports(self, pattern: str) -> bool:
        return pattern in self.patterns

    def describe(self) -> str:
        """A few lines for the CLI and error messages."""
        pats = ", ".join(p for p in PATTERNS if p in self.patterns) or "none"
        lines = [f"{self.name} [{self.family}: {FAMILIES[self.family]}; {self.kind}] {self.summary}",
                 f"  patterns: {pats}", f"  backends: {', '.join(self.backends) or 'none'}",
                 f"  decode: {'yes' if self.decode else 'no'}"]
        if self.seed:
            lines.append(f"  seed rows: {', '.join('S%d' % s for s in self.seed)}")
        for opt in self.options:
            lines.append(f"  option {opt.name} = {opt.default!r}: {opt.allowed()}. {opt.doc}")
        return "\n".join(lines)


class Engine(Protocol):
    """An execution engine for a prepared call. ``can_run`` returns None when it can run the call,
    else a sentence saying why not."""

    name: str

    def can_run(self, call: AttentionCall, plan: Any) -> str | None: ...

    def run(self, call: AttentionCall, plan: Any) -> torch.Tensor: ...


class Method:
    """Base class of a registered method. Subclasses set ``info`` and implement ``engines``.

    - ``prepare(call)`` turns validated options into a plan (a Pattern, a block selection...).
    - ``engines()`` lists engines in auto order; their names must equal ``info.backends``.
    - ``reference(call)`` is the readable reference form (the method's spec), any dtype.
    - ``oracle_inputs(call)`` gives (mask, bias) for exact methods: the method equals
      ``ak.reference`` with them.
    - ``sample_options(rng, q_len, k_len)`` draws a random valid configuration for property tests.
      A method whose options are tensors sized by the model (e.g. embeddings ``(H, R, D)``) may add
      keyword parameters ``heads`` / ``kv_heads`` / ``head_dim``: callers that know the sizes pass
      those the signature names (see ``sample_shape_keywords``).
    - ``bench_options(q_len, k_len, density=None)`` gives the deterministic configuration the
      benchmark runs (see the module docstring for the exact contract).
    """

    info: MethodInfo

    def validate(self, call: AttentionCall) -> None:
        """Cross-option checks that need the call's shapes; raise OptionError."""

    def prepare(self, call: AttentionCall) -> Any:
        return None

    def engines(self) -> Sequence[Engine]:
        return ()

    def reference(self, call: AttentionCall) -> torch.Tensor:
        raise NotImplementedError(f"{self.info.name} has no reference form")

    def oracle_inputs(self, call: AttentionCall) -> tuple[Any, Any] | None:
        return None

    def sample_options(self, rng: np.random.Generator, q_len: int, k_len: int) -> dict[str, Any]:
        return {}

    def sample_shape_keywords(self, **shape: int) -> dict[str, int]:
        """The entries of ``shape`` (heads, kv_heads, head_dim) that ``sample_options`` accepts."""
        return self.shape_keywords(self.sample_options, **shape)

    @staticmethod
    def shape_keywords(fn, **shape: int) -> dict[str, int]:
        """The entries of ``shape`` that the hook ``fn`` names in its signature."""
        import inspect

        params = inspect.signature(fn).parameters
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            return dict(shape)
        return {k: v for k, v in shape.items() if k in params}

    def bench_options(self, q_len: int, k_len: int, density: float | None = None) -> dict[str, Any]:
        """Options for ``attnkit bench`` at these lengths: ``{}`` = the declared defaults. With
        ``density``, map it to the method's sparsity knob, or raise NotImplementedError when there
        is none (contract in the module docstring)."""
        if density is not None:
            raise NotImplementedError(
                f"method {self.info.name!r} has no sparsity knob to set a density with "
                "(Method.bench_options)")
        return {}

    def owns_layer(self, options: dict[str, Any]) -> bool:
        """Whether ``ak.nn.Attention`` builds this method's own module (``build_layer``) for these
        validated options, instead of projections + ``ak.attend``. Methods of kind ``layer``
        always do; a functional method may for some options (e.g. ``learned=True``: a layer that
        owns the trainable parameters whose outputs the functional form takes as tensors)."""
        return self.info.kind == "layer"

    def build_layer(self, *, dim: int, heads: int, kv_heads: int, head_dim: int, causal: bool,
                    cross: bool, context_dim: int | None, **options: Any):
        """Methods of kind ``layer``: the ``nn.Module`` that ``ak.nn.Attention`` wraps. It takes
        ``forward(x, context=None, cache=None)`` and ``init_cache(batch)``. ``ak.nn.Attention``
        also passes its ``rope``, ``rope_base``, ``bias`` and ``backend`` when they differ from
        their defaults (False, 10000.0, False, "auto") and ``info.layer_settings`` names them; a
        setting the layer does not declare raises ArgumentError there."""
        raise NotImplementedError(f"{self.info.name} is not a layer method")

    def __repr__(self) -> str:
        return f"<method {self.info.name}>"


_REGISTRY: dict[str, Method] = {}
_LOADED = False


def register(cls_or_obj):
    """Class decorator (or call with an instance): add a method to the registry."""
    method = cls_or_obj() if isinstance(cls_or_obj, type) else cls_or_obj
    name = method.info.name
    if name in _REGISTRY and type(_REGISTRY[name]) is not type(method):
        raise ValueError(f"method {name!r} is registered twice")
    engine_names = tuple(e.name for e in method.engines())
    if method.info.kind != "layer" and engine_names != method.info.backends:
        raise ValueError(f"{name}: info.backends {method.info.backends} != engines {engine_names}")
    _REGISTRY[name] = method
    return cls_or_obj


def _load() -> None:
    global _LOADED
    if not _LOADED:
        _LOADED = True
        importlib.import_module("attnkit.mechanisms")


def get_method(name: str) -> Method:
    """The registered Method object (internal; users call ``method_info``)."""
    _load()
    if not isinstance(name, str):
        raise UnknownMethodError(f"method must be a string name, got {type(name).__name__}.")
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownMethodError(
            f"unknown method {name!r}.{did_you_mean(name, _REGISTRY)} "
            f"Registered methods: {', '.join(sorted(_REGISTRY))} (see `attnkit list`)."
        ) from None


def method_info(name: str) -> MethodInfo:
    """The MethodInfo of a registered method; UnknownMethodError lists close names."""
    return get_method(name).info


def methods(family: str | None = None) -> list[MethodInfo]:
    """Every registered method, sorted by name; optionally only one family (P D A R N T B)."""
    _load()
    if family is not None and family not in FAMILIES:
        raise UnknownMethodError(f"unknown family {family!r}; families are {sorted(FAMILIES)}.")
    infos = [m.info for m in _REGISTRY.values()]
    return sorted((i for i in infos if family is None or i.family == family), key=lambda i: i.name)


def options(*items: Option) -> OptionSet:
    """Shorthand for building an OptionSet in method modules."""
    return OptionSet(tuple(items))
