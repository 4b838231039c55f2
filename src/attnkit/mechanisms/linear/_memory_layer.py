"""The token mixer around a test-time-training memory (Titans' LMM block, used by Miras' models too).

    q, k, v = silu(conv(x W_q)), silu(conv(x W_k)), silu(conv(x W_v))     # depthwise causal conv
    q, k    = l2norm(q), l2norm(k)                                         # per head
    gates   = per kv head and token, from x (the rule maps them to theta, rho, mu, extras)
    y       = memory read (``_memory``), queries of head h read the memory of its kv head
    out     = W_o( RMSNorm(y) * sigmoid(x W_g) )

Confirmed in the Titans paper (arXiv 2501.00663, sec. 4.4 "Architectural Details", read in a
public transcription of the paper): SiLU for q, k, v; l2-normalised q and k; a 1-D depthwise-separable
convolution after each of the q, k, v projections; a normalisation and a gate computed by a linear
layer before the final output projection. Not stated there (ours, marked [UNVERIFIED] in the methods):
conv kernel 4 (Mamba / Gated DeltaNet practice; the Miras transcription also says 4), the gate's
nonlinearity (sigmoid) and that it reads ``x``, per-head RMSNorm, one scalar gate per kv head and
token. With ``kv_heads < heads`` each kv head owns one memory that the query heads of its group read.

The decode cache (``ak.nn.AttentionCache``) holds the conv inputs of the last ``conv_size - 1``
tokens and the memory state (``_memory.MemoryState``: accumulator, momentum, chunk-start anchor).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import ArgumentError, OptionError
from ...nn.cache import AttentionCache
from ...options import Option
from ...registry import Method
from . import _memory

def working_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


class CausalConv(nn.Module):
    """Depthwise causal 1-D convolution over ``x (B, L, C)``; the decode state is the last
    ``kernel - 1`` inputs. ``kernel = 0`` is the identity (no convolution)."""

    def __init__(self, channels: int, kernel: int):
        super().__init__()
        self.kernel = kernel
        if kernel:
            bound = 1 / math.sqrt(kernel)  # nn.Conv1d's default init for groups = channels
            self.weight = nn.Parameter(torch.empty(channels, kernel).uniform_(-bound, bound))
            self.bias = nn.Parameter(torch.empty(channels).uniform_(-bound, bound))

    def forward(self, x: torch.Tensor, state: torch.Tensor | None):
        if not self.kernel:
            return x, x[:, :0]
        B, L, C = x.shape
        past = x.new_zeros(B, self.kernel - 1, C) if state is None else state
        full = torch.cat([past, x], 1)
        w, b = self.weight[:, None, :].to(x.dtype), self.bias.to(x.dtype)
        y = F.conv1d(full.transpose(1, 2), w, b, groups=C)
        return y.transpose(1, 2), full[:, full.shape[1] - (self.kernel - 1):]


class MemoryBlock(nn.Module):
    """Projections, short convolutions, gates, the memory and the output path. Subclasses implement
    ``gate_biases`` (gate name -> initial bias of its linear map), ``rule``, ``gates`` and
    ``init_memory``. ``form`` picks the computation ("chunked", "parallel", "recurrent"; same result)."""

    def __init__(self, dim, heads, kv_heads, head_dim, opts: dict[str, Any]):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim, self.opts = heads, kv_heads, head_dim, opts
        self.chunk, self.read_mode = opts["chunk_size"], opts["read"]
        self.form = "chunked"
        D, H, Hkv = head_dim, heads, kv_heads
        self.q_proj = nn.Linear(dim, H * D, bias=False)
        self.k_proj = nn.Linear(dim, Hkv * D, bias=False)
        self.v_proj = nn.Linear(dim, Hkv * D, bias=False)
        self.convs = nn.ModuleList(CausalConv(n * D, opts["conv_size"]) for n in (H, Hkv, Hkv))
        biases = self.gate_biases()
        self.gate_proj = nn.ModuleDict({name: nn.Linear(dim, Hkv) for name in biases})
        with torch.no_grad():
            for name, bias in biases.items():
                self.gate_proj[name].bias.fill_(bias)
        hidden = int(round(opts["memory_expansion"] * D))
        dims = (D,) + (hidden,) * (opts["memory_depth"] - 1) + (D,)
        self.memory_init = nn.ParameterList(nn.Parameter(t) for t in self.init_memory(dims))
        self.norm = nn.RMSNorm(D, eps=1e-6)
        self.out_gate = nn.Linear(dim, H * D, bias=False)
        self.out_proj = nn.Linear(H * D, dim, bias=False)

    # -- what a method defines --------------------------------------------------------------
    def gate_biases(self) -> dict[str, float]:
        raise NotImplementedError

    def rule(self) -> _memory.Rule:
        raise NotImplementedError

    def gates(self, raw: dict[str, torch.Tensor]):
        """``raw`` pre-activations ``(B, Hkv, L)`` -> ``(theta, rho, mu), extra``."""
        raise NotImplementedError

    def init_memory(self, dims) -> list[torch.Tensor]:
        """Initial accumulators, one ``(Hkv, d_out, d_in)`` tensor per memory layer."""
        raise NotImplementedError

    # -- running ------------------------------------------------------------------------------
    def read(self, x: torch.Tensor, state: dict | None):
        """Memory outputs ``(B, H, L, D)`` (working dtype) for ``x (B, L, dim)``, and the new state."""
        B, L, _ = x.shape
        H, Hkv, D = self.heads, self.kv_heads, self.head_dim
        wd = working_dtype(x)
        state = state or {}
        convs = state.get("conv", (None, None, None))
        projected, new_convs = [], []
        for proj, conv, past in zip((self.q_proj, self.k_proj, self.v_proj), self.convs, convs):
            y, s = conv(proj(x), past)
            projected.append(F.silu(y).to(wd))
            new_convs.append(s)
        q, k, v = projected
        q = F.normalize(q.view(B, L, Hkv, H // Hkv, D).permute(0, 2, 3, 1, 4), dim=-1)
        k = F.normalize(k.view(B, L, Hkv, D).transpose(1, 2), dim=-1)
        v = v.view(B, L, Hkv, D).transpose(1, 2)
        raw = {name: lin(x).to(wd).transpose(1, 2) for name, lin in self.gate_proj.items()}
        gates, extra = self.gates(raw)
        rule = self.rule()
        mem = state.get("memory")
        if mem is None:
            mem = _memory.fresh_state([p.to(wd) for p in self.memory_init], B, rule)
        run = _memory.FORMS[self.form]
        y, mem = run(mem, q, k, v, gates, extra, rule, self.chunk, self.read_mode)
        return y.reshape(B, H, L, D), {"conv": tuple(new_convs), "memory": mem}

    def output(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        B, H, L, D = y.shape
        y = self.norm(y.to(x.dtype)).transpose(1, 2).reshape(B, L, H * D)
        return self.out_proj(y * torch.sigmoid(self.out_gate(x)))

    def step(self, x: torch.Tensor, state: dict | None):
        y, state = self.read(x, state)
        return self.output(y, x), state

    def forward(self, x, context=None, cache: AttentionCache | None = None):
        if context is not None:
            raise ArgumentError("memory layers are self-attention only; do not pass context.")
        out, state = self.step(x, None if cache is None else cache.state)
        if cache is not None:
            cache.state, cache.position = state, cache.position + x.shape[1]
        return out

    def init_cache(self, batch=None) -> AttentionCache:
        return AttentionCache()


def memory_options(chunk_size: int = 16, max_lr: float = 0.1) -> tuple[Option, ...]:
    """Options every memory layer declares."""
    return (
        Option("chunk_size", "int", chunk_size, "tokens per memory chunk: inside a chunk every gradient "
               "is taken at the chunk-start weights (1 = the exact per-token rule); changes the math",
               low=1, high=1 << 16),
        Option("memory_depth", "int", 2, "layers of the memory MLP (1 = linear memory W k; >= 2: "
               "x + LN(W_L gelu(... W_1 x)))", low=1, high=6),
        Option("memory_expansion", "float", 4.0, "hidden width of the memory MLP / head_dim",
               low=0.25, high=64.0),
        Option("read", "choice", "token", "token: y_t = M_t(q_t) after the update of token t; chunk: "
               "read with the chunk-start weights", choices=("token", "chunk")),
        Option("conv_size", "int", 4, "kernel of the depthwise causal conv after the q, k, v "
               "projections (0 = none)", low=0, high=64),
        Option("max_lr", "float", max_lr, "largest inner step size: lr_t = max_lr * sigmoid(x w + b)",
               low=0.0, open_low=True, high=100.0),
    )


class MemoryMethod(Method):
    """A registered test-time-memory layer (``kind="layer"``): causal self-attention only."""

    block: type[MemoryBlock]

    def build_layer(self, *, dim, heads, kv_heads, head_dim, causal, cross, context_dim, **options):
        name = self.info.name
        opts = self.info.options.validate(options, name)
        if not causal or cross:
            raise ArgumentError(f"method {name!r} is a causal memory (it is written token by token); "
                                "build the layer with causal=True and cross=False.")
        if opts["memory_depth"] >= 2 and opts["memory_expansion"] * head_dim < 1:
            raise OptionError(f"method {name!r}: memory_expansion={opts['memory_expansion']} leaves no "
                              f"hidden unit for head_dim={head_dim}; use memory_expansion >= {1 / head_dim}.")
        return self.make_layer(dim, heads, kv_heads, head_dim, opts)

    def make_layer(self, dim, heads, kv_heads, head_dim, opts):
        return self.block(dim, heads, kv_heads, head_dim, opts)


def scaled_normal(Hkv: int, dims, zero_linear: bool = True) -> list[torch.Tensor]:
    """``N(0, 1 / d_in)`` weights per kv head; a one-layer (linear) memory starts at zero."""
    if len(dims) == 2 and zero_linear:
        return [torch.zeros(Hkv, dims[1], dims[0])]
    return [torch.randn(Hkv, o, i) / math.sqrt(i) for i, o in zip(dims[:-1], dims[1:])]


__all__ = ["MemoryBlock", "MemoryMethod", "CausalConv", "memory_options", "scaled_normal"]
