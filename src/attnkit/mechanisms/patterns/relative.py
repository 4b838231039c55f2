"""``relative``: Music Transformer relative-position attention (Huang et al. 2018, arXiv 1809.04281):
``s[i, j] = scale * (q_i . k_j + q_i . E[j - i])`` with a learned table ``E`` (option
``embeddings``, ``(R, D)`` shared or ``(H, R, D)`` per head; differentiable), over full, causal or
windowed attention. The skew trick is the reference form (:func:`attnkit.patterns.relative.
relative_logits`, checked equal to the pair-by-pair gather); the mask engines add the term tile by
tile through a score modification (memory follows the tile). Table layouts, scaling and what was
confirmed in tensor2tensor are documented in :mod:`attnkit.patterns.relative`.

Cross-attention: the relative distance needs one position axis, so only the KV-cache case is
supported (causal, queries at the last Lq positions), which is what decoding uses. The table is the
caller's tensor (a functional method): to train it inside ``ak.nn.Attention(..., method="relative",
embeddings=E)``, make ``E`` an ``nn.Parameter`` registered on your own module.
"""

from __future__ import annotations

import torch

from ...call import pattern_name
from ...errors import OptionError
from ...options import Option
from ...patterns.interval import Full, SlidingWindow, window_sides
from ...patterns.relative import SIDES, relative_logits, relative_score_mod, table_center
from ...reference import reference
from ...registry import MethodInfo, options, register
from ..pattern_method import BLOCK_SIZE, MASK_ENGINES, PatternMethod

# The term q_i . E[j - i] is a D-long dot product per score: FlexAttention's score_mod must be
# pointwise (its compiler refuses the reduction: "Buffers cannot be created while lowering a
# pointwise subgraph", torch 2.11/2.13), so relative runs on the blocksparse and dense engines.
ENGINES = tuple(e for e in MASK_ENGINES if e.name != "flex")


@register
class RelativeMethod(PatternMethod):
    info = MethodInfo(
        name="relative", family="P", kind="exact", decode=True, seed=(67,),
        patterns=frozenset({pattern_name(False, True), pattern_name(True, True), pattern_name(True, False)}),
        summary="Music Transformer relative-position logits q.E[j-i] (skew trick reference)",
        backends=tuple(e.name for e in ENGINES), accepts_mask=True,
        options=options(
            Option("embeddings", "tensor", None, "relative embeddings E, (R, D) or (H, R, D); rows are "
                   "distances j - i from -(m-1) upward (see sides)"),
            Option("sides", "choice", None, "left: R = m rows for distances -(m-1)..0; both: R = 2m-1 rows "
                   "for -(m-1)..m-1 (None: left if causal, both otherwise)", choices=SIDES, nullable=True),
            Option("window", "int", None, "restrict to a sliding window (causal: last `window` keys incl. "
                   "self; noncausal: window//2 each side); None: all keys", low=1, nullable=True),
            BLOCK_SIZE),
        references="Huang et al. 2018, arXiv 1809.04281; Shaw et al. 2018; tensor2tensor common_attention.py")

    def engines(self):
        return ENGINES

    def _table(self, call) -> tuple[torch.Tensor, str]:
        E, sides = call.options["embeddings"], call.options["sides"] or ("left" if call.is_causal else "both")
        if E is None:
            raise OptionError("method 'relative' needs embeddings=E: a (R, D) or (H, R, D) float tensor of "
                              "relative-position embeddings (D = the query head dim).")
        if E.dim() not in (2, 3) or not E.dtype.is_floating_point:
            raise OptionError(f"method 'relative': embeddings has shape {tuple(E.shape)} and dtype {E.dtype}; "
                              "it must be a float tensor (R, D) or (H, R, D).")
        if E.shape[-1] != call.head_dim or (E.dim() == 3 and E.shape[0] not in (1, call.heads)):
            raise OptionError(
                f"method 'relative': embeddings has shape {tuple(E.shape)} but the query has H={call.heads} "
                f"heads of D={call.head_dim}; use (R, {call.head_dim}) or ({call.heads}, R, {call.head_dim}).")
        if sides == "both" and E.shape[-2] % 2 == 0:
            raise OptionError(
                f"method 'relative': sides='both' needs an odd number of rows R = 2m - 1 (distances -(m-1)..m-1), "
                f"got R={E.shape[-2]}; pass sides='left' for a table of distances -(R-1)..0.")
        if E.device != call.device:
            raise OptionError(f"method 'relative': embeddings is on {E.device} but the query is on {call.device}.")
        return E, sides

    def build_pattern(self, call):
        self._table(call)
        window = call.options["window"]
        if window is None:
            return Full(call.is_causal)
        return SlidingWindow(*window_sides(window, None, None, call.is_causal, "relative"), call.is_causal)

    def score_mod(self, call):
        E, sides = self._table(call)
        wd = torch.float64 if call.dtype == torch.float64 else torch.float32
        fn = relative_score_mod(call.causal_offset, table_center(E.shape[-2], sides), call.scale)
        return fn, (call.query.to(wd), E.to(wd))

    def reference(self, call):
        """The skew trick: ``Q E^T`` over the used rows, pad-reshape-slice to absolute columns."""
        E, sides = self._table(call)
        q64 = call.query.to(torch.float64)
        bias = call.scale * relative_logits(q64, E.to(torch.float64), sides, call.k_len)
        keep = self.build_pattern(call).dense(call.q_len, call.k_len, call.device)
        mask = call.attn_mask
        if mask is not None and mask.dtype == torch.bool:
            keep, mask = keep & mask, None
        if sides == "left":  # the masked skew leaves j > i undefined; the table has no such rows: 0
            i = torch.arange(call.q_len, device=call.device)[:, None] + call.causal_offset
            bias = bias.masked_fill(torch.arange(call.k_len, device=call.device) > i, 0.0)
        if mask is not None:
            bias = bias + mask.to(torch.float64)
        return reference(call.query, call.key, call.value, mask=keep, bias=bias,
                         scale=call.scale).to(call.dtype)

    def bench_options(self, q_len, k_len, density=None, *, head_dim=None):
        """A fixed (R = 2 min(Lk, 128) - 1, D) table of small deterministic embeddings."""
        if density is not None:
            return super().bench_options(q_len, k_len, density)
        if head_dim is None:
            from ...errors import OptionError

            raise OptionError("relative needs the head dim to size its embeddings")
        import torch

        gen = torch.Generator().manual_seed(0)
        return {"embeddings": torch.randn(2 * min(k_len, 128) - 1, head_dim, generator=gen) * 0.1}

    def sample_options(self, rng, q_len, k_len, *, heads=None, head_dim=None):
        if head_dim is None:
            raise ValueError("relative.sample_options needs head_dim (and heads) to size the embeddings")
        sides = [None, "left", "both"][int(rng.integers(0, 3))]
        rows = int(rng.integers(1, k_len + 4))
        if sides != "left":
            rows = 2 * (rows // 2) + 1
        shape = (rows, head_dim) if heads is None or rng.random() < 0.5 else (heads, rows, head_dim)
        gen = torch.Generator().manual_seed(int(rng.integers(0, 2**31)))
        opts = {"embeddings": torch.randn(shape, generator=gen, dtype=torch.float64), "sides": sides,
                "block_size": int(rng.choice([16, 32]))}
        if rng.random() < 0.4:
            opts["window"] = int(rng.integers(1, k_len + 3))
        return opts
