"""``gated_cnn``: MambaOut's Gated CNN block as a sequence token mixer -- the no-attention, no-SSM
baseline (Yu, Wang 2024, "MambaOut: Do We Really Need Mamba for Vision?", arXiv 2405.07992).

For ``x (B, L, dim)``, with ``hidden = int(expansion * dim)`` and ``C = int(conv_ratio * dim)``:

    g, i, c = split(fc1(x), [hidden, hidden - C, C])
    c       = depthwise Conv1d(c, kernel_size)        # causal: kernel_size - 1 taps on the left
    y       = fc2( gelu(g) * concat(i, c) )

A token sees the ``kernel_size - 1`` tokens before it (causal) or ``kernel_size // 2`` on each side
(noncausal, odd ``kernel_size``); everything else is per token, so there are no attention heads
(``heads`` / ``kv_heads`` of ``ak.nn.Attention`` do not apply and are not used). Forms: ``parallel``
(one convolution over the sequence), ``recurrent`` (token by token with the last ``kernel_size - 1``
conv inputs as the state), and chunked = the decode cache over chunks of any length; they agree.

Confirmed in the official repository (yuweihao/MambaOut @ 9f2f234, ``models/mambaout.py``,
``GatedCNNBlock``): defaults ``expansion_ratio 8/3, kernel_size 7, conv_ratio 1.0``, GELU, the split
order ``(g, i, c)`` with the convolved channels last, ``fc1``/``fc2``/conv with biases,
``padding = kernel_size // 2`` (2-D, noncausal). Ours [derived, as the spec says]: the 1-D causal
adaptation (left padding) and the decode state. Left out on purpose: the block's own LayerNorm and
residual (``ak.models`` blocks add pre-norm and residual around every token mixer) and DropPath.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import ArgumentError, OptionError
from ...nn.cache import AttentionCache
from ...options import Option
from ...registry import Method, MethodInfo, options, register
from ._memory_layer import CausalConv


class GatedCNN(nn.Module):
    """The Gated CNN token mixer; ``form`` = "parallel" or "recurrent" (same result)."""

    def __init__(self, dim: int, causal: bool, expansion: float, kernel_size: int, conv_ratio: float):
        super().__init__()
        hidden, conv = int(expansion * dim), int(conv_ratio * dim)
        self.causal, self.kernel_size, self.form = causal, kernel_size, "parallel"
        self.split = (hidden, hidden - conv, conv)
        self.fc1 = nn.Linear(dim, 2 * hidden)
        self.conv = CausalConv(conv, kernel_size)
        self.fc2 = nn.Linear(hidden, dim)

    def init_cache(self, batch=None) -> AttentionCache:
        if not self.causal:
            raise ArgumentError("a noncausal gated_cnn sees later tokens and cannot decode token by token; "
                                "build it with causal=True.")
        return AttentionCache()

    def _convolve(self, c: torch.Tensor, state):
        if c.shape[-1] == 0:  # conv_ratio = 0: a plain gated MLP
            return c, state
        if not self.causal:
            w = self.conv.weight[:, None, :].to(c.dtype)
            y = F.conv1d(c.transpose(1, 2), w, self.conv.bias.to(c.dtype), padding=self.kernel_size // 2,
                         groups=c.shape[-1])
            return y.transpose(1, 2), None
        if self.form == "recurrent":
            outs = []
            for t in range(c.shape[1]):
                y, state = self.conv(c[:, t:t + 1], state)
                outs.append(y)
            return torch.cat(outs, 1), state
        return self.conv(c, state)

    def forward(self, x, context=None, cache: AttentionCache | None = None):
        if context is not None:
            raise ArgumentError("gated_cnn mixes a sequence with itself; do not pass context.")
        g, i, c = torch.split(self.fc1(x), self.split, -1)
        c, state = self._convolve(c, None if cache is None else cache.state)
        if cache is not None:
            cache.state, cache.position = state, cache.position + x.shape[1]
        return self.fc2(F.gelu(g) * torch.cat([i, c], -1))


@register
class GatedCNNMethod(Method):
    info = MethodInfo(
        name="gated_cnn", family="R", kind="layer", seed=(10,), decode=True,
        patterns=frozenset({"causal-self", "noncausal-self"}),
        summary="MambaOut Gated CNN: gated MLP with a depthwise conv on part of its input branch "
                "(no attention; heads unused)",
        state_size="(kernel_size - 1) x conv_ratio x dim conv inputs per sequence",
        options=options(
            Option("expansion", "float", 8 / 3, "hidden width / dim of the gated MLP", low=0.0,
                   open_low=True, high=64.0),
            Option("kernel_size", "int", 7, "depthwise conv taps (noncausal: odd, centred)",
                   low=1, high=1025),
            Option("conv_ratio", "float", 1.0, "share of dim that is convolved (C = int(conv_ratio * dim))",
                   low=0.0, high=64.0)),
        references="Yu, Wang 2024, arXiv 2405.07992 (MambaOut), github.com/yuweihao/MambaOut")

    def build_layer(self, *, dim, heads, kv_heads, head_dim, causal, cross, context_dim, **options):
        o = self.info.options.validate(options, "gated_cnn")
        if cross:
            raise ArgumentError("gated_cnn mixes a sequence with itself; cross=True is not supported.")
        hidden, conv = int(o["expansion"] * dim), int(o["conv_ratio"] * dim)
        if hidden < 1 or conv > hidden:
            raise OptionError(f"method 'gated_cnn': expansion={o['expansion']} and "
                              f"conv_ratio={o['conv_ratio']} give hidden={hidden}, conv channels={conv} "
                              f"for dim={dim}; need 1 <= int(conv_ratio * dim) <= int(expansion * dim) (or conv_ratio = 0).")
        if not causal and o["kernel_size"] % 2 == 0:
            raise OptionError(f"method 'gated_cnn': kernel_size={o['kernel_size']} is even; a noncausal "
                              "(centred) convolution needs an odd kernel_size, e.g. 7.")
        return GatedCNN(dim, causal, o["expansion"], o["kernel_size"], o["conv_ratio"])

    def sample_options(self, rng, q_len, k_len):
        return {"kernel_size": int(rng.choice([1, 3, 7])), "conv_ratio": float(rng.choice([0.5, 1.0]))}
