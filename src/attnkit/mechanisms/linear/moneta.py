"""``moneta``: Miras' Moneta, a test-time memory with an l_p attentional bias and l_q retention
(Behrouz, Razaviyayn, Zhong, Mirrokni 2025, "It's All Connected", arXiv 2504.13173).

Per kv head and token, for every weight matrix of the memory MLP (``e_t = M(k_t) - v_t``):

    g_t = p * sign(e_t) * |e_t|^(p-1)                 (gradient of ||e_t||_p^p w.r.t. M(k_t))
    A_t = alpha_t A_{t-1} - eta_t * grad_W(g_t)
    W_t = A_t / ||A_t||_q^(q-2)                        (the norm over the whole matrix)

``rho = alpha``, ``theta = eta``, ``Phi(A) = A / (sum |A|^q + 1e-12)^((q-2)/q)`` in ``_memory``'s
notation. With ``smooth=True`` (the paper's training surrogates) ``sign(x) ~ tanh(10 x)`` and
``|x| ~ sqrt(x^2 + 1e-6)``; ``p = q = 2, smooth=False`` is the delta rule with decay,
``W_t = alpha W_{t-1} - 2 eta e k^T``. Gates ``eta = max_lr * sigmoid(.)``, ``alpha = sigmoid(.)``.

Sources: no official code is public. Eq. 24-25 (the rule above), ``p = 3, q = 4``, the smooth
surrogates (tanh sharpness 10, eps 1e-6) and the memory MLP ``x + LN(W_1 gelu(W_2 x))`` (expansion 4)
are from a third-party transcription (aryateja2106/neural-memory-reproduction, ``MIRAS.context.md``)
as summarised in the team spec. Deviation [documented]: the paper applies the normalisation only at
chunk boundaries during chunk-parallel training; we apply it to every token's weights and take the
chunk's gradients at the chunk-start weights, so ``chunk_size=1`` is exactly the per-token rule.
Gate activations, initial biases and one scalar gate per kv head (not channel-wise) are ours.
"""

from __future__ import annotations

import torch

from ...options import Option
from ...registry import MethodInfo, options, register
from ._memory import Rule
from ._memory_layer import MemoryBlock, MemoryMethod, memory_options, scaled_normal

SHARPNESS, EPS = 10.0, 1e-6


def lp_grad(p: float, smooth: bool):
    if smooth:
        return lambda e, extra: p * torch.tanh(SHARPNESS * e) * (e * e + EPS) ** ((p - 1) / 2)
    return lambda e, extra: p * torch.sign(e) * e.abs() ** (p - 1)


def lq_normalize(q: float):
    return lambda a: a / (a.abs().pow(q).sum((-1, -2), keepdim=True) + 1e-12) ** ((q - 2) / q)


class MonetaBlock(MemoryBlock):
    def gate_biases(self):
        return {"lr": 0.0, "retain": 4.0}

    def rule(self):
        o = self.opts
        return Rule("moneta", lp_grad(o["p"], o["smooth"]), phi=lq_normalize(o["q"]))

    def gates(self, raw):
        theta = self.opts["max_lr"] * torch.sigmoid(raw["lr"])
        rho = torch.sigmoid(raw["retain"])
        return (theta, rho, torch.zeros_like(rho)), {}

    def init_memory(self, dims):
        return scaled_normal(self.kv_heads, dims, zero_linear=False)


@register
class Moneta(MemoryMethod):
    block = MonetaBlock
    info = MethodInfo(
        name="moneta", family="R", kind="layer", seed=(4,), patterns=frozenset({"causal-self"}), decode=True,
        summary="Miras Moneta: MLP memory written by l_p-loss gradient steps, l_q-normalised (layer)",
        state_size="2 x memory params per kv head (accumulator, chunk-start anchor) + conv taps",
        options=options(
            *memory_options(),
            Option("p", "float", 3.0, "exponent of the l_p attentional bias ||M(k) - v||_p^p",
                   low=1.0, high=16.0),
            Option("q", "float", 4.0, "exponent of the l_q retention: W = A / ||A||_q^(q-2)", low=1.0,
                   open_low=True, high=16.0),
            Option("smooth", "bool", True, "smooth surrogates sign ~ tanh(10 x), |x| ~ sqrt(x^2 + 1e-6)")),
        references="Behrouz, Razaviyayn, Zhong, Mirrokni 2025, arXiv 2504.13173 (Miras)")

    def sample_options(self, rng, q_len, k_len):
        return {"chunk_size": int(rng.integers(1, 6)), "memory_depth": int(rng.integers(1, 3))}
