"""``yaad``: Miras' Yaad, a test-time memory with a Huber attentional bias and l2 retention
(Behrouz, Razaviyayn, Zhong, Mirrokni 2025, "It's All Connected", arXiv 2504.13173).

Per kv head and token (error ``e_t = M(k_t) - v_t`` of the memory MLP, ``delta_t > 0`` data-dependent):

    g_t = e_t                       if ||e_t||_2 <= delta_t        (l2 part: gradient of ||e||^2 / 2)
        = delta_t * sign(e_t)       otherwise                       (l1 part, scaled by delta)
    W_t = alpha_t W_{t-1} - eta_t * grad_W(g_t)                       (retention alpha, step size eta)

In ``_memory``'s notation ``theta = eta``, ``rho = alpha``, no momentum. A large outlier value moves
the memory by at most ``eta delta sqrt(D) ||k||`` while the l2 rule moves it linearly in ``||v||``.
``g`` jumps where ``||e|| = delta`` (from ``e`` to ``delta sign(e)``) and ``sign`` jumps at 0, so
low-precision runs may take the other branch: bf16 layers differ from float32 by ~0.1 (relative)
where the other memories differ by ~0.01 (measured on random layers, dim 32-64). Gates: ``eta = max_lr * sigmoid(.)``, ``alpha = sigmoid(.)``, ``delta = softplus(.)``, one
scalar per kv head and token, from ``x``. Block around the memory: ``_memory_layer`` (q, k, v with
SiLU, short conv, l2-normalised q, k; RMSNorm and sigmoid gate before the output projection).

Sources: no official code is public. The rule (Eq. 26 / the "variant 3" Huber update) and the memory
MLP ``x + LN(W_1 gelu(W_2 x))`` (expansion 4) are from a third-party transcription of the paper
(aryateja2106/neural-memory-reproduction, ``MIRAS.context.md``) as summarised in the team spec; the
gates being channel-wise low-rank projections there, we use one scalar per kv head [deviation]; the
gates' activations and initial biases (retention ~0.98, delta ~1) are ours [UNVERIFIED].
Chunked training: gradients inside a chunk at the chunk-start weights (the paper's chunk-wise
parallelisation); ``chunk_size=1`` is the exact per-token rule above.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ...registry import MethodInfo, options, register
from ._memory import Rule
from ._memory_layer import MemoryBlock, MemoryMethod, memory_options, scaled_normal


def huber_grad(e: torch.Tensor, extra: dict) -> torch.Tensor:
    delta = extra["delta"][..., None]
    small = e.norm(dim=-1, keepdim=True) <= delta
    return torch.where(small, e, delta * torch.sign(e))


class YaadBlock(MemoryBlock):
    def gate_biases(self):  # softplus(0.5413) = 1
        return {"lr": 0.0, "retain": 4.0, "delta": 0.5413}

    def rule(self):
        return Rule("yaad", huber_grad)

    def gates(self, raw):
        theta = self.opts["max_lr"] * torch.sigmoid(raw["lr"])
        rho = torch.sigmoid(raw["retain"])
        return (theta, rho, torch.zeros_like(rho)), {"delta": F.softplus(raw["delta"])}

    def init_memory(self, dims):
        return scaled_normal(self.kv_heads, dims)


@register
class Yaad(MemoryMethod):
    block = YaadBlock
    info = MethodInfo(
        name="yaad", family="R", kind="layer", seed=(4,), patterns=frozenset({"causal-self"}), decode=True,
        summary="Miras Yaad: MLP memory written by Huber-loss gradient steps with retention (layer)",
        state_size="2 x memory params per kv head (weights, chunk-start anchor) + conv taps",
        options=options(*memory_options()),
        references="Behrouz, Razaviyayn, Zhong, Mirrokni 2025, arXiv 2504.13173 (Miras)")

    def sample_options(self, rng, q_len, k_len):
        return {"chunk_size": int(rng.integers(1, 6)), "memory_depth": int(rng.integers(1, 3))}
