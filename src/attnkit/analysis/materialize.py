"""``ak.analysis.materialize``: the implicit ``(B, H, Lq, Lk)`` attention matrix of a method.

The Dynamical Systems Framework (Sieber et al. 2024, arXiv 2405.15731) writes every sequence mixer
as ``y_i = sum_j Phi(i, j) u_j``: softmax attention, linear attention, decayed linear attention
(RetNet / Lightning / GLA), SSMs and gated RNNs all have such a ``Phi``, which makes their
"attention maps" comparable. For a method whose output is linear in the values,
``materialize(...) @ v`` reproduces its output (heads expanded under GQA), and the matrix is what
the method's weights are: e.g. ``lam^(i-j) q_i.k_j`` for Lightning, the row-normalized Taylor
kernel for BASED, the per-channel prefix softmax contracted with q for LightNet.

Each method supplies its own matrix: a ``materialize(call)`` method on its registered class
(``call`` is the validated :class:`~attnkit.call.AttentionCall`). This function only validates the
arguments, as ``ak.attend`` does, and looks the hook up; a method without one raises
``ArgumentError``. A method whose output is not linear in v (a normalization after the mixing,
values inside a nonlinearity) must say in its hook's docstring what its matrix means — typically
the matrix at these inputs, which reproduces the output only for these values.
"""

from __future__ import annotations

import torch

from ..api import _dispatch
from ..errors import ArgumentError


def materialize(method: str, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *,
                is_causal: bool = False, scale: float | None = None, enable_gqa: bool = False,
                **options) -> torch.Tensor:
    """The implicit attention matrix ``(B, H, Lq, Lk)`` of ``method`` for these inputs.

    Arguments mean what they mean in ``ak.attend`` (``query (B, H, Lq, D)``, ``key (B, Hkv, Lk, D)``,
    ``value (B, Hkv, Lk, Dv)``; causal is bottom-right aligned). The result is in the method's
    working precision (float64 for float64 inputs, float32 otherwise). For every method with the
    hook, ``materialize(...) @ value.repeat_interleave(H // Hkv, 1)`` equals ``ak.attend(...)``
    within that precision.
    """
    impl, call, _, _ = _dispatch(query, key, value, None, 0.0, is_causal, scale, enable_gqa, method,
                                 "auto", None, options)
    hook = getattr(impl, "materialize", None)
    if hook is None:
        with_hook = ", ".join(sorted(m.name for m in _methods_with_hook())) or "none"
        raise ArgumentError(
            f"method {method!r} has no implicit-attention hook (no `materialize(call)` on its class), "
            f"so its attention matrix cannot be materialized. Methods with one: {with_hook}.")
    return hook(call)


def _methods_with_hook():
    from ..registry import get_method, methods

    return [i for i in methods() if getattr(get_method(i.name), "materialize", None) is not None]
