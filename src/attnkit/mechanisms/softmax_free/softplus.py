"""``softplus``: softplus attention with length scaling and re-weighting (LSSA / LSSAR; Gao,
Spratling, Gionfrida, "Softplus Attention with Re-weighting Boosts Length Extrapolation in Large
Language Models", arXiv 2501.13428). Not softmax attention.

    s_ij  = scale * q_i . k_j                   over the n_i keys row i sees (mask, window, causal)
    P_ij  = softplus(lam_i s_ij),  lam_i = length_scale * log(n_i)     (entropy-invariant factor)
    A_ij  = P_ij / sum_j P_ij                                          (LSSA: l1 normalisation)
    R_ij  = relu(A_ij - reweight_threshold / n_i) ** reweight_power    (LSSAR re-weighting)
    out_i = sum_j R_ij v_j / sum_j R_ij       (R = A when power = 1 and threshold = 0: plain LSSA)

Shapes: q ``(B, H, Lq, D)``, k ``(B, Hkv, Lk, D)``, v ``(B, Hkv, Lk, Dv)`` -> ``(B, H, Lq, Dv)``.
Rows sum to 1; a row with no visible key gives 0. Softplus does not overflow, so no running maximum
is needed; ``n_i`` is counted per row (i + 1 for causal self-attention), so decoding with a KV cache
equals the full forward.

UNVERIFIED (the official repository github.com/iminfine/freeatten, named in the paper, could not be
retrieved, nor the paper's method section): the exact form of the length factor (here
``length_scale * log n_i``; the spec's stand-in, spec "linear.md" §10) and of the re-weighting
(here a power with an optional threshold at ``threshold / n_i``, the uniform level when 1). What
the abstract states and this follows: softplus in place of exp, l1 normalisation, a dynamic scale
factor from entropy invariance, and a re-weighting that amplifies large weights and suppresses
small ones, applicable without retraining (v2 abstract) — hence re-weighting is off by default
(power 1, threshold 0 = LSSA). Defaults are this library's, not confirmed paper values; confirm
against the official code before reporting results.
"""

from __future__ import annotations

import torch

from ...backends.activation import LengthScaledSoftplus, softplus
from ...call import ALL_PATTERNS
from ...options import Option
from ...registry import MethodInfo, options, register
from .base import BACKENDS, BLOCK_SIZE, QK_NORM, WINDOW, ActivationMethod


@register
class SoftplusAttention(ActivationMethod):
    info = MethodInfo(
        name="softplus", family="N", kind="approximate", patterns=ALL_PATTERNS, decode=True, seed=(40,),
        summary="softplus attention, length-scaled logits, l1-normalised, optional re-weighting "
                "(LSSA/LSSAR; not softmax)",
        backends=BACKENDS, accepts_mask=True,
        options=options(
            Option("length_scale", "float", 1.0, "c in lam_i = c * log(n_i), the factor on the scores "
                   "of a row seeing n_i keys", low=0.0),
            Option("reweight_power", "float", 1.0, "p of the re-weighting relu(A - t/n)^p "
                   "(1 with threshold 0 = no re-weighting, LSSA)", low=1.0, high=64.0),
            Option("reweight_threshold", "float", 0.0, "t of the re-weighting: weights below t/n_i are "
                   "dropped (t = 1: the uniform level)", low=0.0, high=1.0, open_high=True),
            WINDOW, QK_NORM, BLOCK_SIZE),
        references="Gao, Spratling, Gionfrida 2025, arXiv 2501.13428; github.com/iminfine/freeatten "
                   "(not retrievable: formula unverified)")

    def activation(self, call):
        return LengthScaledSoftplus(call.options["length_scale"])

    def normalization(self, call):
        return "sum"

    def sharpening(self, call):
        p, t = call.options["reweight_power"], call.options["reweight_threshold"]
        return None if (p == 1.0 and t == 0.0) else (p, t)

    def reference(self, call):
        s, keep, v = self.scores(call)
        zero = torch.zeros_like(s)
        n = keep.sum(-1, keepdim=True).to(s.dtype)
        lam = call.options["length_scale"] * torch.log(n.clamp_min(1))
        p = torch.where(keep, softplus(lam * torch.where(keep, s, zero)), zero)
        a = p / _nonzero(p.sum(-1, keepdim=True))
        power, threshold = call.options["reweight_power"], call.options["reweight_threshold"]
        if (power, threshold) != (1.0, 0.0):
            r = torch.where(keep, torch.relu(a - threshold / n.clamp_min(1)) ** power, zero)
            a = r / _nonzero(r.sum(-1, keepdim=True))
        return (a @ v).to(call.dtype)

    def sample_options(self, rng, q_len, k_len):
        reweight = rng.random() < 0.5
        return {"length_scale": float(rng.uniform(0.0, 2.0)),
                "reweight_power": float(rng.uniform(1.0, 4.0)) if reweight else 1.0,
                "reweight_threshold": float(rng.uniform(0.0, 0.9)) if reweight and rng.random() < 0.5 else 0.0,
                "window": None if rng.random() < 0.4 else int(rng.integers(1, k_len + 3)),
                "qk_norm": bool(rng.random() < 0.3),
                "block_size": int(rng.choice([16, 32, 64, 128]))}


def _nonzero(x):
    return torch.where(x > 0, x, torch.ones_like(x))
