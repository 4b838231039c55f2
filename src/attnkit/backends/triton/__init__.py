"""attnkit's own Triton kernels. Importing this package does not import Triton: the kernels are
imported on first use, so attnkit installs and runs without Triton (``can_run`` says why a Triton
backend cannot run a call).

- :mod:`.activation` / :mod:`.activation_kernels` / :mod:`.activation_bwd_kernels`: forward and
  backward of activation attention (sigmoid, length-scaled softplus with l1 normalisation and
  re-weighting), causal / noncausal, the ``triton`` backend of ``sigmoid`` and ``softplus``.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from ..activation import ActivationSpec, LengthScaledSoftplus, Sigmoid

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
HEAD_DIMS = (16, 32, 64, 128)
ACTIVATIONS = {Sigmoid: 0, LengthScaledSoftplus: 1}  # kernel code of each activation
NORMALIZATIONS = {Sigmoid: ("none", "count", "sqrt_count"), LengthScaledSoftplus: ("sum",)}

# log2(1 + t) = t * sum_k LOG2_1P_COEFFS[k] t^k on [0, 1], relative error < 1.5e-6 in float32
# (Horner). Fitted here by iteratively re-weighted least squares on the relative error (a near-minimax
# fit) of log2(1 + t) / t over 200001 points, degree 6; the 16-bit kernels' softplus uses it
# in place of a logarithm (tests/test_softmax_free.py checks the bound).
LOG2_1P_COEFFS = (1.4426932334899902, -0.7211593985557556, 0.4776679277420044, -0.3390877842903137,
                  0.21528290212154388, -0.09579657018184662, 0.020400987938046455)


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """Triton's CPU interpreter is on (``TRITON_INTERPRET=1``): kernels run with numpy, slowly."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def fix_interpreter_scalars() -> None:
    """Workaround, interpreter only: Triton <= 3.6 converts a scalar tensor to an int with
    ``int(ndarray_of_shape_1)``, a TypeError since numpy 2.4, so ``range(0, n)`` over a kernel
    argument fails (triton-lang/triton#9171, fixed by triton-lang/triton#9172). Idempotent; a
    no-op unless ``TRITON_INTERPRET=1``."""
    if not interpreting():
        return
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor
    if getattr(original, "attnkit_fixed", False):
        return

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched.attnkit_fixed = True
    interpreter._patch_lang_tensor = patched


class TritonActivationEngine:
    """Fused kernels for plain causal / noncausal activation attention (no window, no mask)."""

    name = "triton"

    def can_run(self, call, spec: ActivationSpec) -> str | None:
        from ...patterns.interval import Full

        if not triton_available():
            return "Triton is not installed (pip install triton; GPU only)"
        if call.device.type != "cuda" and not (call.device.type == "cpu" and interpreting()):
            return f"the Triton kernels need a CUDA device (tensors are on {call.device.type})"
        if call.dtype not in KERNEL_DTYPES:
            return f"the Triton kernels take float16 / bfloat16 / float32, got {call.dtype}"
        if call.head_dim not in HEAD_DIMS or call.value_dim != call.head_dim:
            return (f"the Triton kernels need D = Dv in {HEAD_DIMS}, got D={call.head_dim}, "
                    f"Dv={call.value_dim}")
        if call.attn_mask is not None:
            return "attn_mask is not supported by the Triton kernels (use backend='blocksparse')"
        if call.dropout_p > 0:
            return "dropout is not implemented for activation attention"
        if type(spec.pattern) is not Full:
            return (f"the Triton kernels run full causal / noncausal attention only, not "
                    f"{spec.pattern.describe()} (use backend='blocksparse')")
        if type(spec.activation) not in ACTIVATIONS:
            return f"no Triton kernel for the activation {spec.activation}"
        allowed = NORMALIZATIONS[type(spec.activation)]
        if spec.normalize not in allowed:
            return (f"the Triton kernels run {type(spec.activation).__name__} with normalize in "
                    f"{allowed}, not {spec.normalize!r} (use backend='blocksparse')")
        return None

    def auto_skip(self, call, spec) -> str | None:
        if call.device.type == "cpu":
            return "the Triton interpreter (TRITON_INTERPRET=1, CPU) is used only when named"
        return None

    def run(self, call, spec: ActivationSpec) -> torch.Tensor:
        from .activation import triton_activation_attention

        return triton_activation_attention(call, spec)
