"""``dense``: exact softmax attention, a drop-in for ``torch.nn.functional.scaled_dot_product_attention``.

Differences from SDPA, on purpose: causal with ``Lq != Lk`` is bottom-right aligned (query i sees
key j iff ``j <= i + Lk - Lq``, the KV-cache convention; SDPA aligns top-left), ``is_causal`` may be
combined with ``attn_mask``, and a row with no visible key is 0 (SDPA gives NaN).
Backends: ``sdpa`` (torch picks its kernel), ``sdpa_cudnn`` / ``sdpa_flash`` / ``sdpa_efficient`` /
``sdpa_math`` (one SDPA kernel forced, for benchmarks), ``oracle`` (the float64 reference).
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from ..call import ALL_PATTERNS, AttentionCall
from ..errors import BackendUnavailableError
from ..reference import causal_mask, reference
from ..registry import Method, MethodInfo, register
from ..backends.dense import masked_softmax_attention


def sdpa(call: AttentionCall, native_gqa: bool = True) -> torch.Tensor:
    """SDPA with attnkit's conventions (bottom-right causal, empty rows are zeros).
    ``native_gqa=False`` repeats K/V to the query heads for kernels without GQA support."""
    q, k, v = call.query, call.key, call.value
    gqa = call.group > 1
    if gqa and not native_gqa:
        k, v = call.expanded_kv()
        gqa = False
    if call.attn_mask is None and (not call.is_causal or call.q_len == call.k_len):
        return F.scaled_dot_product_attention(q, k, v, dropout_p=call.dropout_p, is_causal=call.is_causal,
                                              scale=call.scale, enable_gqa=gqa)
    keep = torch.ones(1, 1, call.q_len, call.k_len, dtype=torch.bool, device=call.device)
    bias = None
    if call.is_causal:
        keep = keep & causal_mask(call.q_len, call.k_len, call.device)
    if call.attn_mask is not None:
        if call.attn_mask.dtype == torch.bool:
            keep = keep & call.attn_mask
        else:
            bias = call.attn_mask
    k, v = call.expanded_kv()
    return masked_softmax_attention(q, k, v, keep, bias, call.scale, call.dropout_p)


class SdpaEngine:
    """SDPA, optionally restricted to one of its kernels."""

    def __init__(self, name: str, kernel: str | None):
        self.name, self.kernel = name, kernel

    def can_run(self, call: AttentionCall, plan) -> str | None:
        if self.kernel in ("CUDNN_ATTENTION", "FLASH_ATTENTION", "EFFICIENT_ATTENTION"):
            if call.device.type != "cuda":
                return f"the {self.kernel.lower()} SDPA kernel needs a CUDA device"
            if self.kernel != "EFFICIENT_ATTENTION" and call.dtype not in (torch.float16, torch.bfloat16):
                return f"the {self.kernel.lower()} SDPA kernel needs float16/bfloat16, got {call.dtype}"
        return None

    def auto_skip(self, call: AttentionCall, plan) -> str | None:
        return None if self.kernel is None else "a forced SDPA kernel is used only when named"

    def run(self, call: AttentionCall, plan) -> torch.Tensor:
        if self.kernel is None:
            return sdpa(call)
        from torch.nn.attention import SDPBackend, sdpa_kernel

        caught: list = []
        try:
            with warnings.catch_warnings(record=True) as caught, sdpa_kernel(getattr(SDPBackend, self.kernel)):
                warnings.simplefilter("always")
                return sdpa(call, native_gqa=self.kernel != "EFFICIENT_ATTENTION")
        except RuntimeError as err:  # torch's warnings say which constraint failed
            why = "; ".join(str(w.message) for w in caught if "not used because" not in str(w.message))
            raise BackendUnavailableError(
                f"SDPA kernel {self.kernel} cannot run this call: {err} {why}".strip()) from err


class OracleEngine:
    """The float64 oracle, cast back to the input dtype."""

    name = "oracle"

    def can_run(self, call: AttentionCall, plan) -> str | None:
        if call.dropout_p > 0:
            return "the oracle has no dropout"
        return None

    def auto_skip(self, call, plan):
        return "the float64 oracle is used only when named"

    def run(self, call: AttentionCall, plan) -> torch.Tensor:
        return reference(call.query, call.key, call.value, mask=call.attn_mask,
                         is_causal=call.is_causal, scale=call.scale).to(call.dtype)


_ENGINES = (SdpaEngine("sdpa", None), SdpaEngine("sdpa_cudnn", "CUDNN_ATTENTION"),
            SdpaEngine("sdpa_flash", "FLASH_ATTENTION"), SdpaEngine("sdpa_efficient", "EFFICIENT_ATTENTION"),
            SdpaEngine("sdpa_math", "MATH"), OracleEngine())


@register
class Dense(Method):
    info = MethodInfo(
        name="dense", family="P", kind="exact", patterns=ALL_PATTERNS, decode=True,
        summary="exact softmax attention (SDPA; every SDPA kernel; the float64 oracle)",
        backends=tuple(e.name for e in _ENGINES), accepts_mask=True, dropout=True,
        references="Vaswani et al. 2017; torch.nn.functional.scaled_dot_product_attention")

    def engines(self):
        return _ENGINES

    def oracle_inputs(self, call: AttentionCall):
        keep = causal_mask(call.q_len, call.k_len, call.device) if call.is_causal else None
        mask = call.attn_mask
        if mask is not None and mask.dtype != torch.bool:
            return keep, mask
        if keep is not None and mask is not None:
            keep = keep & mask
        return (keep if keep is not None else mask), None

    def reference(self, call: AttentionCall) -> torch.Tensor:
        return OracleEngine().run(call, None)
