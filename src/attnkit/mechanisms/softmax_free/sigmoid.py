"""``sigmoid``: sigmoid attention (Ramapuram et al., "Theory, Analysis, and Best Practices for
Sigmoid Self-Attention", ICLR 2025, arXiv 2409.04431; FlashSigmoid). Not softmax attention.

    out_i = sum_{j visible} sigmoid(scale * q_i . k_j + b) v_j  [/ n_i or / sqrt(n_i)]

with ``b = sigmoid_bias`` (default ``-log(Lk)``; FlashSigmoid's name for it). ``sigmoid(s - log n) = e^s / (n + e^s)``: with all-zero
scores each weight is ``1 / (n + 1)``, so a row's initial mass is about 1, as with softmax; unlike
softmax, no row maximum or sum is needed. Shapes: q ``(B, H, Lq, D)``, k ``(B, Hkv, Lk, D)``,
v ``(B, Hkv, Lk, Dv)`` -> ``(B, H, Lq, Dv)``. A row with no visible key gives 0.

Confirmed in github.com/apple/ml-sigmoid-attention:
- the bias is ONE scalar for the whole score tensor, whatever the mask: FlashSigmoid adds
  ``sigmoid_bias`` to every score (``flash_sigmoid/README.md``, the reference ``attention_ref`` of
  ``flash_sigmoid/tests/test_flash_attn.py``); masked entries are -inf before the sigmoid, i.e. 0.
  Under a causal mask the bias is therefore NOT per row (not -log of the visible-key count): it is
  -log n with n the sequence length. The released LM config fixes ``sigmoid_bias: -7.62`` (-ln 2048,
  the training length) and keeps it when evaluating at 1K-16K
  (``attention_simulator/examples/language_modeling/configs/..._flash_sigmoid_multilayer_rope.yaml``).
  Here ``sigmoid_bias=None`` means ``-log(Lk)`` of the call (the full key length, also under
  causal masks); pass a number to fix it, as the paper does at evaluation.
- decoding: with ``sigmoid_bias=None`` a decode step with a KV cache of t keys uses ``-log(t)``,
  not the full forward's ``-log(L)``; to decode, fix it (e.g. ``sigmoid_bias=-math.log(max_len)``).
- optional row normalisations of the research code (``seq_len_normalized_sigmoid`` divides row i by
  i + 1, ``sqrt_seq_len_...`` by sqrt(i + 1); ``layers/activations.py``): ``normalize="count"`` /
  ``"sqrt_count"`` divide by the number of keys the row sees (= i + 1 for causal self-attention;
  the research code uses i + 1 whatever the mask).
- QK-norm is LayerNorm over the head dim of q and k before RoPE and the scaling
  (``layers/attention.py``, ``qk_norm: true`` in the LM config), with learnable gains (nn.LayerNorm).
  ``qk_norm=True`` here has no gains (equal to the official layer at initialisation) and, through
  ``ak.nn.Attention(rope=True)``, normalises the rotated q and k (the official order is norm, then
  RoPE).
- not here: the temperature ``attn_temp`` (scores * exp(temp), 0 by default: use ``scale``), ALiBi,
  and hybrid-norm (a norm on the attention output; a block-level choice, spec [RECALL], not in the
  released simulator code).
"""

from __future__ import annotations

import math

import torch

from ...backends.activation import Sigmoid
from ...call import ALL_PATTERNS
from ...options import Option
from ...registry import MethodInfo, options, register
from .base import BACKENDS, BLOCK_SIZE, QK_NORM, WINDOW, ActivationMethod


def resolved_bias(call) -> float:
    bias = call.options["sigmoid_bias"]
    return -math.log(call.k_len) if bias is None else bias


@register
class SigmoidAttention(ActivationMethod):
    info = MethodInfo(
        name="sigmoid", family="N", kind="approximate", patterns=ALL_PATTERNS, decode=True, seed=(53,),
        summary="sigmoid attention sigmoid(q·k·scale + b) v, b = -log(Lk) (not softmax; FlashSigmoid)",
        backends=BACKENDS, accepts_mask=True,
        options=options(
            Option("sigmoid_bias", "float", None, "b added to every score before the sigmoid (None = "
                   "-log(Lk), the call's key length; fix it to decode with a KV cache)", nullable=True),
            Option("normalize", "choice", "none", "divide row i by nothing, by the number n_i of keys "
                   "it sees (count) or by sqrt(n_i)", choices=("none", "count", "sqrt_count")),
            WINDOW, QK_NORM, BLOCK_SIZE),
        references="Ramapuram et al. 2024, arXiv 2409.04431; github.com/apple/ml-sigmoid-attention")

    def activation(self, call):
        return Sigmoid(resolved_bias(call))

    def normalization(self, call):
        return call.options["normalize"]

    def reference(self, call):
        s, keep, v = self.scores(call)
        w = torch.where(keep, torch.sigmoid(s + resolved_bias(call)), torch.zeros_like(s))
        out = w @ v
        n = keep.sum(-1, keepdim=True).to(out.dtype)
        rows = {"none": torch.ones_like(n), "count": n, "sqrt_count": n.sqrt()}[call.options["normalize"]]
        out = torch.where(rows > 0, out / rows.clamp_min(1e-300), torch.zeros_like(out))
        return out.to(call.dtype)

    def sample_options(self, rng, q_len, k_len):
        # an explicit bias (near -log Lk): None follows the key length, which a KV-cache decode
        # changes at every step (see the module doc); tests of sigmoid_bias=None are in
        # tests/test_softmax_free.py
        return {"sigmoid_bias": float(-math.log(k_len) + rng.normal()),
                "normalize": str(rng.choice(["none", "count", "sqrt_count"])),
                "window": None if rng.random() < 0.4 else int(rng.integers(1, k_len + 3)),
                "qk_norm": bool(rng.random() < 0.3),
                "block_size": int(rng.choice([16, 32, 64, 128]))}
