"""``document``: packed variable-length sequences; a query sees the keys of its own document only
(causal within it with ``is_causal``). Documents by per-position ids (``document_ids`` or
``lengths``; queries at the last Lq positions, so decoding works) or, for cross-attention, by
``q_document_ids`` and ``k_document_ids``; see :mod:`attnkit.patterns.prefix`.
"""

from __future__ import annotations

import torch

from ...call import ALL_PATTERNS
from ...errors import OptionError
from ...options import Option
from ...patterns.prefix import document
from ...registry import MethodInfo, options, register
from ..pattern_method import BLOCK_SIZE, MASK_BACKENDS, PatternMethod

_IDS = ("document_ids", "lengths", "q_document_ids", "k_document_ids")


@register
class DocumentMethod(PatternMethod):
    info = MethodInfo(
        name="document", family="P", kind="exact", patterns=ALL_PATTERNS, decode=True,
        summary="packed documents (varlen): a query sees its own document only",
        backends=MASK_BACKENDS, accepts_mask=True,
        options=options(
            Option("document_ids", "tensor", None, "(L,) or (B, L) int id of each position (N >= Lk)",
                   nullable=True),
            Option("lengths", "object", None, "document lengths: ints or a (B, n) int tensor (sum >= Lk)"),
            Option("q_document_ids", "tensor", None, "cross-attention: (Lq,) or (B, Lq) ids of the queries",
                   nullable=True),
            Option("k_document_ids", "tensor", None, "cross-attention: (Lk,) or (B, Lk) ids of the keys",
                   nullable=True),
            BLOCK_SIZE),
        references="packed-sequence masking (FlashAttention varlen cu_seqlens; FlexAttention document mask)")

    def build_pattern(self, call):
        o = call.options
        for name in _IDS:
            t = o[name]
            if isinstance(t, torch.Tensor) and t.device != call.device:
                raise OptionError(f"method 'document': {name} is on {t.device} but the query is on "
                                  f"{call.device}; move it with {name}.to(query.device).")
        return document(o["document_ids"], lengths=o["lengths"], q_document_ids=o["q_document_ids"],
                        k_document_ids=o["k_document_ids"], causal=call.is_causal)

    def bench_options(self, q_len, k_len, density=None):
        """Four packed documents of equal length (self-attention), or per-side ids (cross)."""
        if density is not None:
            return super().bench_options(q_len, k_len, density)
        if q_len == k_len:
            return {"lengths": [k_len // 4] * 3 + [k_len - 3 * (k_len // 4)]}
        import torch

        return {"q_document_ids": (torch.arange(q_len) * 4 // q_len)[None],
                "k_document_ids": (torch.arange(k_len) * 4 // k_len)[None]}

    def sample_options(self, rng, q_len, k_len):
        opts = {"block_size": int(rng.choice([16, 32]))}
        if q_len > k_len or (q_len != k_len and rng.random() < 0.4):
            opts["q_document_ids"] = torch.as_tensor(rng.integers(0, 3, q_len))
            opts["k_document_ids"] = torch.as_tensor(rng.integers(0, 3, k_len))
            return opts
        lengths = []
        while sum(lengths) < k_len:
            lengths.append(int(rng.integers(1, 20)))
        if rng.random() < 0.5:
            opts["lengths"] = lengths
        else:  # ids of runs in random order, sometimes not contiguous at all
            runs = torch.as_tensor(rng.permutation(len(lengths)))
            ids = torch.repeat_interleave(runs, torch.as_tensor(lengths))
            opts["document_ids"] = ids if rng.random() < 0.7 else torch.as_tensor(rng.integers(0, 3, k_len))
        return opts
