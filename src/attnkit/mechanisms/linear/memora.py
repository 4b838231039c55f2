"""``memora``: Miras' Memora, a test-time memory with l2 attentional bias and KL retention; the
memory's weights stay on a scaled simplex (Behrouz, Razaviyayn, Zhong, Mirrokni 2025, arXiv 2504.13173).

Per kv head and token, for every weight matrix of the memory MLP (``e_t = M(k_t) - v_t``):

    W_t = c * Softmax( alpha_t * log W_{t-1} - eta_t * grad_W( ||e_t||^2 / 2 ) )     (softmax per row)

Since the softmax ignores a constant added to a row, ``alpha log W_{t-1}`` may be replaced by
``alpha Z_{t-1}`` with ``Z`` the *unnormalised* log-weights: the rule is exactly the linear recurrence
``Z_t = alpha_t Z_{t-1} - eta_t G_t`` with ``W_t = c softmax_rows(Z_t)`` -- ``rho = alpha``,
``theta = eta``, ``Phi = c softmax`` in ``_memory``'s notation. Every ``W_t`` is non-negative with rows
summing to ``c``. Gates ``eta = max_lr * sigmoid(.)``, ``alpha = sigmoid(.)`` per kv head and token.

Sources: no official code is public. The update (Eq. 27: softmax of ``alpha log W - eta grad``),
``c = 1``, the memory MLP and the per-slice softmax are from a third-party transcription
(aryateja2106/neural-memory-reproduction, ``MIRAS.context.md``) as summarised in the team spec.
Deviation [documented]: the paper's chunk-parallel training applies the exact non-linear update to the
first ("lag") token of each chunk and linearised updates to the rest; we keep the exact rule for every
token and take the chunk's gradients at the chunk-start weights (the same approximation as Titans,
Moneta, Yaad); ``chunk_size=1`` is exactly the per-token rule. Gate activations/biases are ours.
"""

from __future__ import annotations

import torch

from ...options import Option
from ...registry import MethodInfo, options, register
from ._memory import Rule
from ._memory_layer import MemoryBlock, MemoryMethod, memory_options


class MemoraBlock(MemoryBlock):
    def gate_biases(self):
        return {"lr": 0.0, "retain": 4.0}

    def rule(self):
        c = self.opts["scale"]
        return Rule("memora", lambda e, extra: e, phi=lambda z: c * torch.softmax(z, -1))

    def gates(self, raw):
        theta = self.opts["max_lr"] * torch.sigmoid(raw["lr"])
        rho = torch.sigmoid(raw["retain"])
        return (theta, rho, torch.zeros_like(rho)), {}

    def init_memory(self, dims):
        return [torch.randn(self.kv_heads, o, i) for i, o in zip(dims[:-1], dims[1:])]


@register
class Memora(MemoryMethod):
    block = MemoraBlock
    info = MethodInfo(
        name="memora", family="R", kind="layer", seed=(4,), patterns=frozenset({"causal-self"}), decode=True,
        summary="Miras Memora: MLP memory on a scaled simplex, KL retention = softmax update (layer)",
        state_size="2 x memory params per kv head (log-weights, chunk-start anchor) + conv taps",
        options=options(*memory_options(), Option(
            "scale", "float", 1.0, "c: every row of every memory weight matrix sums to c", low=0.0,
            open_low=True, high=1e4)),
        references="Behrouz, Razaviyayn, Zhong, Mirrokni 2025, arXiv 2504.13173 (Miras)")

    def sample_options(self, rng, q_len, k_len):
        return {"chunk_size": int(rng.integers(1, 6)), "memory_depth": int(rng.integers(1, 3))}
