"""``seer``: SeerAttention — a block gate picks the (query block, key block) tiles, then exact
block-sparse attention (Gao et al. 2024, arXiv 2410.13276).

Queries and keys are cut into blocks of ``gate_block`` (``Bg``, official 64); ``nq = ceil(Lq/Bg)``,
``nk = ceil(Lk/Bg)``. A gate scores every tile; the kept tiles become the mask (``(B, H, Lq, D)``
queries, ``(B, Hkv, Lk, D)`` keys, query head h reads kv head ``h // (H / Hkv)``)::

    gate      G[b, h, qb, kb]  in [0, 1], a softmax over the key blocks a query block may see
    visible   V[qb, kb]        = kb <= qb (causal; all blocks otherwise)
    kept      threshold  Mb = G > threshold
              nz_ratio   Mb = top-k' of each row, k' = max(1, int((1 - sqrt(1 - nz_ratio)) * nk))
              density    Mb = top-ceil(density * |visible kb|) of each row (1 = dense attention)
    dense     last_block_dense: the last two query-block rows keep every block
    M[i, j]   = Mb[i // Bg, j // Bg] ∧ V ∧ (j <= i if causal)
    out       = softmax(q kᵀ · scale, masked by M) v         (exact on that mask: kind "exact")

The gate. The paper's AttnGate is a learned module (pooled pre-RoPE q / k, per-head linear maps,
block RoPE, distilled from the block-max of full attention): it lives in ``ak.nn`` —
``ak.nn.Attention(dim, heads, method="seer", learned=True, causal=True)`` owns it, and
:func:`attnkit.mechanisms.sparse._seer_gate.train_gate` distils it (see that module). The
functional form ``ak.attend(..., method="seer")`` takes the gate's output as ``gate_scores``
(``(B|1, H|1, nq, nk)``, what the layer passes), or, without it, uses a **training-free stand-in**:
``G = softmax_kb(max_{j in kb} q̄_qb · k_j · scale)`` with ``q̄_qb`` the mean query of block qb — a
pooled estimate of the block-max attention the real gate is trained to predict. The stand-in is
this library's choice, not the paper's; its selections are only as good as pooled q·k scores.

Budgets. ``threshold`` (default 2e-3, the configuration docstring's value; the README's range is
5e-4 ... 5e-3, higher = sparser), ``nz_ratio`` (the official top-k mode), or ``density``; giving
two raises OptionError. ``density=1`` (or a negative threshold) is dense attention (with
``last_block_dense`` irrelevant then).

Confirmed in microsoft/SeerAttention @ aba03e3: ``seer_attn/modules/common.py``
(``get_sparse_attn_mask_from_threshold``: ``x > threshold``, last two rows set when
``use_dense_for_last_block``, then ``tril``; ``get_sparse_attn_mask_from_nz_ratio``:
``topk = int((1 - sqrt(1 - nz_ratio)) * downsample_len)``, at least 1, same dense rows and tril);
``seer_attn/prefill_sparse/llama/modeling_llama_seerattn.py`` (the gate's softmax only in the
threshold mode at inference, the block-causal gate mask, ``block_sparse_triton_fn`` with
``BLOCK_M = BLOCK_N = block size`` and token causality inside the diagonal tiles);
``configuration_llama_seerattn.py`` (block 64, hidden 128, ``last_block_dense=True``, threshold
2e-3 in the docstring, 0.0 as the code default). Differences: the official prefill runs causal
self-attention only; attnkit also runs the non-causal calls (self and cross: no block is masked).
"""

from __future__ import annotations

import math

import torch

from ...errors import OptionError
from ...options import Option
from ...patterns.interval import Full
from ...patterns.plan import cdiv
from ...patterns.selection import BlockSelection
from ...registry import MethodInfo, options, register
from ..pattern_method import BLOCK_SIZE, MASK_BACKENDS
from .base import DynamicMethod, budget_from_density, density_option, key_means, rows_per_chunk, top_k_mask

DEFAULT_THRESHOLD = 2e-3
DEFAULT_BLOCK = 64
GATE_TYPES = ("Qavg_Kmaxminavg", "Qavg_Kmaxmin", "Qavg_Kavg", "Qavg_Kmax", "Qmaxminavg_Kmaxminavg")
BUDGET_KNOBS = ("threshold", "nz_ratio", "density")


def learned_option(what: str) -> Option:
    """The shared ``learned`` option of methods with a trainable layer (seer, dma, hcam)."""
    return Option("learned", "bool", False, f"ak.nn.Attention builds the trainable layer that owns {what}; "
                  "ak.attend takes the tensors that layer produces instead")


def refuse_learned(method: str, options: dict, tensors: str) -> None:
    if options["learned"]:
        raise OptionError(
            f"method {method!r}: learned=True asks for the trainable layer, which ak.attend does not have: build "
            f"ak.nn.Attention(dim, heads, method={method!r}, learned=True, ...), or pass {tensors} to ak.attend.")


def budget(method: str, options: dict) -> tuple[str, float]:
    """``(knob, value)``: threshold (default), nz_ratio or density; two given raises OptionError."""
    given = [k for k in BUDGET_KNOBS if options[k] is not None]
    if len(given) > 1:
        raise OptionError(f"method {method!r}: pass one of threshold / nz_ratio / density, got "
                          + ", ".join(f"{k}={options[k]}" for k in given) + ".")
    if not given:
        return "threshold", DEFAULT_THRESHOLD
    return given[0], options[given[0]]


def pooled_gate(query: torch.Tensor, key: torch.Tensor, block: int, scale: float, causal: bool) -> torch.Tensor:
    """The training-free stand-in gate ``(B, H, nq, nk)``: softmax over the visible key blocks of
    ``max_{j in kb} mean(q of qb) · k_j · scale`` (float32 / float64; no gradient)."""
    q = query.detach()
    B, H, Lq, D = q.shape
    Hk, Lk = key.shape[1], key.shape[2]
    g = H // Hk
    qm = key_means(q, block)  # (B, H, nq, D): mean of each query block (partial blocks: their rows)
    nq, nk = qm.shape[2], cdiv(Lk, block)
    k = key.detach().to(qm.dtype)
    logits = torch.empty(B, H, nq, nk, dtype=qm.dtype, device=q.device)
    step = max(1, rows_per_chunk(B * H * Lk, q.device) // max(1, g))
    for r0 in range(0, nq, step):
        r1 = min(nq, r0 + step)
        s = qm[:, :, r0:r1].reshape(B, Hk, g * (r1 - r0), D) @ k.transpose(-1, -2)  # (B, Hk, g*R, Lk)
        s = torch.nn.functional.pad(s, (0, nk * block - Lk), value=float("-inf"))
        logits[:, :, r0:r1] = s.view(B, Hk, g * (r1 - r0), nk, block).amax(-1).view(B, H, r1 - r0, nk) * scale
    if causal:
        logits = logits.masked_fill(visible_blocks(nq, nk, True, q.device).logical_not(), float("-inf"))
    return torch.softmax(logits, -1)


def visible_blocks(nq: int, nk: int, causal: bool, device=None) -> torch.Tensor:
    """``(nq, nk)`` bool: the key blocks a query block may see (block-causal: ``kb <= qb``)."""
    if not causal:
        return torch.ones(nq, nk, dtype=torch.bool, device=device)
    return torch.arange(nk, device=device) <= torch.arange(nq, device=device)[:, None]


def block_mask(gate: torch.Tensor, knob: str, value: float, causal: bool, last_block_dense: bool) -> torch.Tensor:
    """The kept tiles ``(B, H, nq, nk)`` from gate scores (see the module docstring)."""
    nq, nk = gate.shape[-2:]
    visible = visible_blocks(nq, nk, causal, gate.device)
    ranked = gate.masked_fill(~visible, float("-inf"))
    if knob == "threshold":
        keep = gate > value
    elif knob == "nz_ratio":
        keep = top_k_mask(ranked, max(1, int((1 - math.sqrt(1 - value)) * nk)))
    else:
        keep = top_k_mask(ranked, budget_from_density(value, visible.sum(-1)))
    if last_block_dense:
        keep = keep.clone()
        keep[..., -2:, :] = True
    return keep & visible


@register
class Seer(DynamicMethod):
    info = MethodInfo(
        name="seer", family="D", kind="exact", seed=(21,),
        patterns=frozenset({"causal-self", "noncausal-self", "noncausal-cross"}),
        summary="SeerAttention: a block gate keeps (query block, key block) tiles; exact block-sparse attention",
        backends=MASK_BACKENDS, layer_settings=frozenset({"rope", "rope_base", "bias", "backend"}),
        options=options(
            Option("gate_block", "int", DEFAULT_BLOCK, "query / key block of the gate (seerattn_gate_block_size)",
                   low=1),
            Option("threshold", "float", None, f"keep tiles whose gate probability exceeds this (default "
                   f"{DEFAULT_THRESHOLD}; < 0 keeps all)", nullable=True),
            Option("nz_ratio", "float", None, "official top-k mode: k' = max(1, int((1 - sqrt(1 - nz_ratio)) * nk)) "
                   "tiles per query block", low=0.0, high=1.0, open_low=True, nullable=True),
            density_option("each query block's visible key blocks"),
            Option("last_block_dense", "bool", True, "the last two query blocks attend densely "
                   "(seerattn_last_block_dense)"),
            Option("gate_scores", "tensor", None, "gate probabilities (B|1, H|1, nq, nk) from a trained AttnGate; "
                   "None: the training-free pooled q·k stand-in", nullable=True),
            learned_option("the AttnGate (pooled q / k, per-head linear maps, block RoPE)"),
            Option("gate_hidden", "int", None, "AttnGate hidden size F (seerattn_gate_hidden_size, default 128; "
                   "learned layer only)", low=2, nullable=True),
            Option("gate_type", "choice", None, "AttnGate pooling (seerattn_gate_type, default Qavg_Kmaxminavg; "
                   "learned layer only)", choices=GATE_TYPES, nullable=True),
            BLOCK_SIZE),
        references="Gao et al. 2024, SeerAttention (arXiv 2410.13276); github.com/microsoft/SeerAttention "
                   "seer_attn/modules/common.py, seer_attn/prefill_sparse/attn_gate.py")

    def check_options(self, call):
        o = call.options
        budget(self.info.name, o)
        refuse_learned(self.info.name, o, "gate_scores=")
        for name in ("gate_hidden", "gate_type"):
            if o[name] is not None:
                raise OptionError(f"method 'seer': {name}={o[name]!r} configures the learned AttnGate of "
                                  "ak.nn.Attention(..., method='seer', learned=True); ak.attend takes gate_scores=.")
        scores = o["gate_scores"]
        if scores is not None:
            want = (cdiv(call.q_len, o["gate_block"]), cdiv(call.k_len, o["gate_block"]))
            ok = scores.dim() == 4 and tuple(scores.shape[-2:]) == want and scores.shape[0] in (1, call.batch) \
                and scores.shape[1] in (1, call.heads)
            if not ok:
                raise OptionError(f"method 'seer': gate_scores has shape {tuple(scores.shape)}; it must be "
                                  f"(B|1, H|1, nq, nk) = ({call.batch}|1, {call.heads}|1, {want[0]}, {want[1]}) "
                                  f"for Lq={call.q_len}, Lk={call.k_len} and gate_block={o['gate_block']}.")

    def select(self, call):
        o = call.options
        knob, value = budget(self.info.name, o)
        block = o["gate_block"]
        gate = o["gate_scores"]
        if gate is None:
            gate = pooled_gate(call.query, call.key, block, call.scale, call.is_causal)
        gate = gate.detach().to(call.device).expand(call.batch, call.heads, *gate.shape[-2:])
        tiles = block_mask(gate, knob, value, call.is_causal, o["last_block_dense"])
        pattern = BlockSelection(tiles, block, block)
        if call.is_causal:
            pattern = pattern & Full(causal=True)
        return self.selection(call, pattern, details={"gate": gate, "tiles": tiles, "gate_block": block,
                                                      "budget": (knob, value)})

    def sample_options(self, rng, q_len, k_len):
        opts = {"gate_block": int(rng.integers(1, 9)), "last_block_dense": bool(rng.random() < 0.5)}
        knob = rng.choice(["threshold", "nz_ratio", "density"])
        opts[str(knob)] = {"threshold": float(rng.choice([-1.0, 0.05, 0.2, 0.5])),
                           "nz_ratio": float(rng.choice([0.2, 0.5, 1.0])),
                           "density": float(rng.choice([0.1, 0.3, 0.6, 1.0]))}[str(knob)]
        return opts

    def bench_options(self, q_len, k_len, density=None):
        """Blocks of 64 (16 below 1024 tokens, so short runs still have several blocks); the
        paper's threshold mode by default; ``density`` keeps that share of each query block's
        visible key blocks (about half as many of all pairs when causal)."""
        opts = {} if min(q_len, k_len) >= 1024 else {"gate_block": 16}
        if density is not None:
            opts["density"] = density
        return opts

    # -- the learned layer ----------------------------------------------------------------------
    def owns_layer(self, options):
        return bool(options.get("learned"))

    def build_layer(self, **kwargs):
        from ._seer_gate import SeerLayer

        return SeerLayer(self, **kwargs)


__all__ = ["Seer", "block_mask", "pooled_gate", "visible_blocks"]
