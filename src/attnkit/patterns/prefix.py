"""Prefix-LM and document (packed variable-length sequence) masks.

**prefix_lm**: bidirectional over the first ``prefix`` keys, causal after (T5 / UniLM prefix LM;
FlexAttention's ``prefix_lm_causal``)::

    visible(i, j) = j < prefix  or  j <= i          (i bottom-right aligned: q + Lk - Lq)

``prefix`` is an int or a per-batch ``(B,)`` int tensor. The mask is causal only after the prefix,
so it is a noncausal pattern (``is_causal=False``): ``is_causal=True`` would forbid exactly the
bidirectional prefix.

**document**: several sequences packed into one row; a query sees the keys of its own document
only (and, with ``is_causal``, only those at or before it). Documents are given one of two ways:

- one id per position: ``document_ids`` ``(L,)`` or ``(B, L)`` int, or ``lengths`` (document
  lengths, ints or a ``(B, n)`` int tensor with zero padding). These describe positions
  ``0 .. N-1`` of the key sequence and must cover every key (``N >= Lk``); queries sit at their
  bottom-right aligned positions ``q + Lk - Lq`` (so ``Lq <= Lk``), which is what decoding and
  chunked prefill need: ids of positions not yet in the call are unused.
- separate ids for cross-attention: ``q_document_ids`` ``(Lq,)`` / ``(B, Lq)`` and
  ``k_document_ids`` ``(Lk,)`` / ``(B, Lk)``: query i sees key j iff their ids are equal (and
  ``j <= i + Lk - Lq`` when causal).

Plans: a prefix is one interval per query (``[0, max(prefix - 1, i)]``); documents whose ids form
contiguous runs are one interval per query too. Other id layouts get the exact tiles from an id
overlap count per tile pair, then the rule on the overlapping tiles only.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..errors import OptionError, ShapeError
from .base import Pattern, _to_device
from .plan import PARTIAL, EMPTY, cdiv
from .tiles import Span, key_tiles, query_tiles, refine, span_covers, span_present, states


class PrefixLM(Pattern):
    """Bidirectional prefix, causal after (module doc). Build it with :func:`prefix_lm`."""

    def __init__(self, prefix: int | torch.Tensor):
        if isinstance(prefix, torch.Tensor):
            self.prefix = prefix.reshape(-1).long()
            self.batch = self.prefix.shape[0] if self.prefix.shape[0] > 1 else None
        else:
            self.prefix = int(prefix)

    def params(self, q_len, k_len):
        return {"offset": k_len - q_len, "prefix": self.prefix}

    def rule(self, b, h, q, k, p):
        prefix = p["prefix"]
        per_batch = isinstance(prefix, torch.Tensor) and prefix.dim() > 0  # flex passes a number as a 0-d tensor
        last = (prefix[b] if per_batch else prefix) - 1
        return k <= torch.maximum(q + p["offset"], torch.as_tensor(last, device=q.device))

    def _plan(self, q_len, k_len, block_q, block_k, device):
        p = _to_device(self.params(q_len, k_len), device)
        last = torch.as_tensor(p["prefix"], device=device).view(-1, 1, 1) - 1
        qf, ql = (x[:, None] for x in query_tiles(q_len, k_len, block_q, device))
        ks, ke = key_tiles(k_len, block_k, device)
        zero = torch.zeros_like(qf)
        s = Span(zero, torch.maximum(ql, last), zero, torch.maximum(qf, last))
        return states(span_present(s, ks, ke), span_covers(s, ks, ke)).unsqueeze(1)

    def describe(self):
        p = self.prefix
        shown = p if isinstance(p, int) else f"per-batch {p.tolist() if p.numel() <= 4 else tuple(p.shape)}"
        return f"prefix_lm(prefix={shown})"


def prefix_lm(prefix: int | torch.Tensor) -> PrefixLM:
    """Keys ``j < prefix`` visible to every query, causal after; ``prefix`` an int or ``(B,)`` tensor."""
    if isinstance(prefix, torch.Tensor):
        if prefix.dtype.is_floating_point or prefix.dtype == torch.bool or prefix.dim() > 1:
            raise OptionError(f"prefix_lm: prefix has dtype {prefix.dtype} and shape {tuple(prefix.shape)}; "
                              "it must be an int or a (B,) integer tensor of per-batch prefix lengths.")
        if prefix.numel() and int(prefix.min()) < 0:
            raise OptionError(f"prefix_lm: prefix has a negative entry {int(prefix.min())}; lengths are >= 0.")
    elif isinstance(prefix, bool) or not isinstance(prefix, int) or prefix < 0:
        raise OptionError(f"prefix_lm: prefix={prefix!r} is invalid; it must be an int >= 0 or a (B,) "
                          "integer tensor.")
    return PrefixLM(prefix)


class Document(Pattern):
    """Packed-sequence mask (module doc). Build it with :func:`document`."""

    def __init__(self, *, ids: torch.Tensor | None = None, lengths: torch.Tensor | None = None,
                 q_ids: torch.Tensor | None = None, k_ids: torch.Tensor | None = None, causal: bool = False):
        self.ids, self.lengths, self.q_ids, self.k_ids, self.causal = ids, lengths, q_ids, k_ids, causal
        rows = [t.shape[0] for t in (ids, lengths, q_ids, k_ids) if t is not None]
        if len(set(r for r in rows if r > 1)) > 1:
            raise ShapeError(f"document: q_document_ids and k_document_ids have batch sizes {rows}; they "
                             "must match (or be 1 to share one layout).")
        self.batch = max(rows) if max(rows) > 1 else None
        if q_ids is not None:  # one layout shared by the batch is expanded to the other's rows
            self.q_ids, self.k_ids = (t.expand(max(rows), -1) for t in (q_ids, k_ids))

    @property
    def paired(self) -> bool:
        return self.q_ids is not None

    def check(self, q_len, k_len):
        if self.paired:
            for name, t, n in (("q_document_ids", self.q_ids, q_len), ("k_document_ids", self.k_ids, k_len)):
                if t.shape[1] != n:
                    raise ShapeError(f"document: {name} has {t.shape[1]} positions but the call has "
                                     f"{'Lq' if name[0] == 'q' else 'Lk'}={n}; give one id per "
                                     f"{'query' if name[0] == 'q' else 'key'}.")
            return
        if q_len > k_len:
            raise OptionError(
                f"document: with one id per position, queries sit at the last Lq key positions, which "
                f"needs Lq <= Lk (got Lq={q_len}, Lk={k_len}); pass q_document_ids and k_document_ids.")
        covered = (self.lengths.sum(1).min() if self.lengths is not None else self.ids.shape[1])
        if int(covered) < k_len:
            what = "lengths sum" if self.lengths is not None else "document_ids cover"
            raise ShapeError(f"document: {what} {int(covered)} positions but the call has Lk={k_len} keys; "
                             "every key needs a document (add a last document for padding).")

    def _position_ids(self, k_len: int) -> torch.Tensor:
        if self.ids is not None:
            return self.ids
        ends = self.lengths.cumsum(1)
        pos = torch.arange(k_len, device=ends.device).expand(ends.shape[0], k_len).contiguous()
        return torch.searchsorted(ends, pos, right=True)

    def params(self, q_len, k_len):
        if self.paired:
            return {"q_ids": self.q_ids, "k_ids": self.k_ids, "q_shift": 0, "offset": k_len - q_len,
                    "causal": self.causal}
        ids = self._position_ids(k_len)
        return {"q_ids": ids, "k_ids": ids, "q_shift": k_len - q_len, "offset": k_len - q_len,
                "causal": self.causal}

    def rule(self, b, h, q, k, p):
        same = p["q_ids"][b, q + p["q_shift"]] == p["k_ids"][b, k]
        return same & (k <= q + p["offset"]) if p["causal"] else same

    def _plan(self, q_len, k_len, block_q, block_k, device):
        p = _to_device(self.params(q_len, k_len), device)
        if not self.paired:
            ids = p["k_ids"][:, :k_len]
            runs = _runs(ids)
            if runs is not None:
                return _run_tiles(runs, q_len, k_len, block_q, block_k, p["causal"], device)
        q_ids = p["q_ids"][:, p["q_shift"]:p["q_shift"] + q_len]
        k_ids = p["k_ids"][:, :k_len]
        meet = _shared_ids(q_ids, k_ids, block_q, block_k)
        if p["causal"]:
            _, ql = query_tiles(q_len, k_len, block_q, device)
            ks, _ = key_tiles(k_len, block_k, device)
            meet = meet & (ks <= ql[:, None])
        tiles = torch.where(meet, PARTIAL, EMPTY).to(torch.int8).unsqueeze(1)
        return refine(self, tiles, q_len, k_len, block_q, block_k, device)

    def describe(self):
        if self.paired:
            src = "q/k ids"
        elif self.lengths is not None:
            src = f"lengths {self.lengths.tolist() if self.lengths.numel() <= 6 else tuple(self.lengths.shape)}"
        else:
            src = f"ids {tuple(self.ids.shape)}"
        return f"document({src}{', causal' if self.causal else ''})"


def _runs(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """First and last position of each position's run of equal ids ``(Bp, N)``, or None when some id
    appears in two separate runs (then documents are not intervals)."""
    N = ids.shape[1]
    pos = torch.arange(N, device=ids.device).expand_as(ids)
    change = torch.ones_like(ids, dtype=torch.bool)
    change[:, 1:] = ids[:, 1:] != ids[:, :-1]
    ordered = ids.sort(1).values
    distinct = torch.ones_like(ids, dtype=torch.bool)
    distinct[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    if not torch.equal(change.sum(1), distinct.sum(1)):
        return None
    start = torch.where(change, pos, 0).cummax(1).values
    ends_here = torch.ones_like(change)
    ends_here[:, :-1] = change[:, 1:]
    end = torch.where(ends_here, pos, N).flip(1).cummin(1).values.flip(1)
    return start, end


def _run_tiles(runs, q_len, k_len, block_q, block_k, causal, device):
    start, end = runs
    qf, ql = query_tiles(q_len, k_len, block_q, device)
    ks, ke = key_tiles(k_len, block_k, device)
    hi_first, hi_last = end[:, qf], end[:, ql]
    if causal:
        hi_first, hi_last = torch.minimum(hi_first, qf), torch.minimum(hi_last, ql)
    s = Span(start[:, qf, None], hi_last[..., None], start[:, ql, None], hi_first[..., None])
    return states(span_present(s, ks, ke), span_covers(s, ks, ke)).unsqueeze(1)


def _shared_ids(q_ids: torch.Tensor, k_ids: torch.Tensor, block_q: int, block_k: int) -> torch.Tensor:
    """``(Bp, nQ, nK)``: whether a query tile and a key tile hold a common document id."""
    values, inverse = torch.unique(torch.cat([q_ids, k_ids], 1), return_inverse=True)
    qi, ki = inverse[:, :q_ids.shape[1]], inverse[:, q_ids.shape[1]:]
    Bp = max(q_ids.shape[0], k_ids.shape[0])

    def tile_has(idx, length, block):
        has = torch.zeros(Bp, cdiv(length, block), values.numel(), device=idx.device)
        rows = torch.arange(Bp, device=idx.device)[:, None].expand(Bp, length)
        tiles = (torch.arange(length, device=idx.device) // block).expand(Bp, length)
        has[rows, tiles, idx.expand(Bp, length)] = 1.0
        return has

    return (tile_has(qi, q_ids.shape[1], block_q) @ tile_has(ki, k_ids.shape[1], block_k).transpose(1, 2)) > 0


def _as_ids(name: str, t) -> torch.Tensor:
    if not isinstance(t, torch.Tensor) or t.dtype.is_floating_point or t.dtype == torch.bool or t.dim() not in (1, 2):
        shown = f"dtype {t.dtype} shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else repr(type(t).__name__)
        raise OptionError(f"document: {name} ({shown}) is invalid; it must be an integer tensor (L,) or (B, L).")
    if t.numel() == 0:
        raise OptionError(f"document: {name} is empty; give one id per position.")
    return t.reshape(1, -1).long() if t.dim() == 1 else t.long()


def _as_lengths(lengths) -> torch.Tensor:
    if isinstance(lengths, torch.Tensor):
        bad = lengths.dtype.is_floating_point or lengths.dtype == torch.bool or lengths.dim() not in (1, 2)
        t = None if bad else (lengths.reshape(1, -1) if lengths.dim() == 1 else lengths).long()
    elif isinstance(lengths, Sequence) and lengths and all(isinstance(x, int) and not isinstance(x, bool)
                                                           for x in lengths):
        t = torch.tensor([list(lengths)], dtype=torch.long)
    else:
        t = None
    if t is None or t.numel() == 0 or int(t.min()) < 0:
        raise OptionError(f"document: lengths={lengths!r} is invalid; it must be document lengths >= 0, "
                          "as ints or a (B, n) integer tensor (zero-padded).")
    return t


def document(document_ids: torch.Tensor | None = None, *, lengths=None, q_document_ids=None,
             k_document_ids=None, causal: bool = False) -> Document:
    """Packed documents: give exactly one of ``document_ids``, ``lengths``, or the pair
    ``q_document_ids`` + ``k_document_ids`` (module doc)."""
    given = [n for n, v in (("document_ids", document_ids), ("lengths", lengths),
                            ("q_document_ids", q_document_ids), ("k_document_ids", k_document_ids))
             if v is not None]
    pair = {"q_document_ids", "k_document_ids"}
    if not (len(given) == 1 and given[0] in ("document_ids", "lengths")) and set(given) != pair:
        raise OptionError(
            f"document: got {given or 'no document option'}; pass exactly one of document_ids=(B, L) ids, "
            "lengths=[...] document lengths, or both q_document_ids and k_document_ids (cross-attention).")
    if document_ids is not None:
        return Document(ids=_as_ids("document_ids", document_ids), causal=causal)
    if lengths is not None:
        return Document(lengths=_as_lengths(lengths), causal=causal)
    return Document(q_ids=_as_ids("q_document_ids", q_document_ids),
                    k_ids=_as_ids("k_document_ids", k_document_ids), causal=causal)
