"""``attend`` and ``explain``: one call for every method, SDPA's signature and layout."""

from __future__ import annotations

from typing import Any

import torch

from .backends.base import Explanation, require, select
from .call import AttentionCall
from .errors import ArgumentError, UnsupportedPatternError
from .patterns.base import Pattern
from .patterns.order import TokenOrder
from .registry import Method, get_method, methods


def _dispatch(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, method,
              backend, pattern, options) -> tuple[Method, AttentionCall, Any, Explanation]:
    if pattern is not None:
        if method != "dense":
            raise ArgumentError(
                f"pass either method={method!r} or pattern=..., not both: a Pattern object is run "
                "by the mask engines directly.")
        if not isinstance(pattern, Pattern):
            raise ArgumentError(
                f"pattern must be an attnkit Pattern (e.g. ak.patterns.sliding_window(256)), got "
                f"{type(pattern).__name__}.")
        from .mechanisms.pattern_method import GivenPattern

        impl: Method = GivenPattern(pattern)
    else:
        impl = get_method(method)
    if not isinstance(backend, str):
        raise ArgumentError(f"backend must be a string such as 'auto', got {backend!r}.")
    info = impl.info
    call = AttentionCall.build(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    if info.kind == "layer" and not impl.engines():
        raise ArgumentError(
            f"method {info.name!r} owns parameters and has no functional form; use "
            f"ak.nn.Attention(dim, heads, method={info.name!r}).")
    if call.pattern not in info.patterns:
        raise UnsupportedPatternError(
            f"method {info.name!r} does not support {call.pattern} attention (Lq={call.q_len}, "
            f"Lk={call.k_len}, is_causal={call.is_causal}); it supports: "
            f"{', '.join(sorted(info.patterns))}. attnkit calls a call 'self' when Lq == Lk.")
    if call.attn_mask is not None and not info.accepts_mask:
        raise ArgumentError(
            f"method {info.name!r} does not take attn_mask (its weights are not a masked softmax); "
            "drop attn_mask or use a mask-taking method such as 'dense' or a pattern method.")
    if call.dropout_p > 0 and not info.dropout:
        raise ArgumentError(
            f"method {info.name!r} does not implement attention dropout (dropout_p={call.dropout_p}); "
            "pass dropout_p=0.0 and apply dropout outside, or use method='dense'.")
    call = call.with_options(info.options.validate(options, info.name))
    impl.validate(call)
    plan = impl.prepare(call)
    engine, why = select(info.name, call.pattern, impl.engines(), call, plan, backend)
    return impl, call, require(engine, why), why


def attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask=None,
           dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None,
           enable_gqa: bool = False, *, method: str = "dense", backend: str = "auto",
           pattern: Pattern | None = None, **options) -> torch.Tensor:
    """Attention of ``query (B, H, Lq, D)`` over ``key (B, Hkv, Lk, D)`` / ``value (B, Hkv, Lk, Dv)``
    with the named ``method`` and its ``**options``; returns ``(B, H, Lq, Dv)``.

    The positional arguments mean what they mean in ``torch.nn.functional.scaled_dot_product_attention``
    (bool ``attn_mask``: True = attend; float: added to the scores). Differences: causal with
    ``Lq != Lk`` is bottom-right aligned (query i sees key j iff ``j <= i + Lk - Lq``), ``is_causal``
    combines with ``attn_mask``, and rows with no visible key are 0, never NaN.
    ``backend="auto"`` picks the first engine that can run (see ``explain``); a named backend runs
    that engine or raises ``BackendUnavailableError``.
    """
    _, call, engine, why = _dispatch(query, key, value, attn_mask, dropout_p, is_causal, scale,
                                     enable_gqa, method, backend, pattern, options)
    return engine.run(call, why.plan)


def explain(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
            enable_gqa=False, *, method="dense", backend="auto", pattern=None, **options) -> Explanation:
    """Which backend ``attend`` with the same arguments runs, and why each other one does not."""
    _, _, _, why = _dispatch(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa,
                             method, backend, pattern, options)
    return why


def token_order(method: str, length: int, *, is_causal: bool = False, **options) -> TokenOrder:
    """The tiled token order the mask engines run a grid pattern method in, for ``length`` tokens
    and the method's ``**options`` (as given to ``attend``): ``.order[r]`` is the row-major grid
    cell at position ``r``, ``.inverse`` undoes it. Give ``attend`` (or an ``ak.nn`` layer) tokens
    ``x[..., order, :]`` with ``token_order='tiled'`` and no call moves them; the output comes back
    in the same order (``out[..., inverse, :]`` is the row-major one). OptionError when the
    configuration has no tiled order that computes fewer tiles."""
    impl = get_method(method)
    if "token_order" not in impl.info.options.names():
        grids = [i.name for i in methods() if "token_order" in i.options.names()]
        raise ArgumentError(f"method {method!r} has no token_order option; the grid pattern methods that "
                            f"have one: {', '.join(grids)}.")
    x = torch.zeros(1, 1, length, 1)
    call = AttentionCall.build(x, x, x, None, 0.0, is_causal, None, False)
    call = call.with_options(impl.info.options.validate({**options, "token_order": "tiled"}, method))
    return impl.tiled_order(call)

