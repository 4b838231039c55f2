"""Music Transformer relative-position attention (Huang et al. 2018, arXiv 1809.04281).

Scores get a learned term per relative distance ``d = j - i`` (key minus query position)::

    s[i, j] = scale * (q_i . k_j + q_i . E[d + center])

``E`` is a table of ``R`` rows (shared ``(R, D)`` or per head ``(H, R, D)``); rows outside the
table contribute 0. Two layouts, both from tensor2tensor (``tensor2tensor/layers/common_attention.py``,
read at bafdc1b): ``"left"`` — ``get_relative_embeddings_left``: ``R = m`` rows for distances
``-(m-1) .. 0`` (``center = m - 1``; the causal Music Transformer); ``"both"`` —
``get_relative_embeddings_left_right``: ``R = 2m - 1`` rows for ``-(m-1) .. m-1``. Distances past
the table get zero rows (t2t pads zeros, it does not clip as Shaw et al. do). The relative term is
scaled with the content term: t2t multiplies q by ``D ** -0.5`` before both products
(``multihead_attention``).

Three forms of the same numbers:

- ``relative_logits`` — the skewing trick (``_relative_position_to_absolute_position_masked`` /
  ``_unmasked``): ``Q E^T`` over the ``L`` (or ``2L - 1``) used rows, then a pad-reshape-slice that
  moves column ``d + L - 1`` of row i to column ``j``. ``O(L^2 + L D)`` memory. The readable
  reference; self-attention shapes (cross-attention with Lq < Lk pads the queries to Lk rows).
- ``relative_logits_gather`` — ``q_i . E[j - i + center]`` gathered pair by pair, ``O(L^2 D)``: the
  definition, used to check the skew.
- ``relative_score_mod`` — what the engines run, tile by tile: for each block of query rows it
  multiplies the queries with the band of ``E`` rows their tile's distances need (``q_tile @
  E_band^T``) and gathers from that, so memory follows the score tile, not ``L``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

SIDES = ("left", "both")


def table_center(rows: int, sides: str) -> int:
    """Row of distance 0: ``m - 1`` with ``m = rows`` (left) or ``m = (rows + 1) / 2`` (both)."""
    return rows - 1 if sides == "left" else (rows - 1) // 2


def _per_head(table: torch.Tensor) -> torch.Tensor:
    return table.unsqueeze(0) if table.dim() == 2 else table


def used_rows(table: torch.Tensor, sides: str, length: int) -> torch.Tensor:
    """The rows for distances ``-(L-1) .. 0`` (left, ``L`` rows) or ``-(L-1) .. L-1`` (both,
    ``2L - 1`` rows), zero where the table ends: t2t's pad-then-slice, ``(Ht, rows, D)``."""
    table = _per_head(table)
    center = table_center(table.shape[1], sides)
    last = 0 if sides == "left" else length - 1
    distances = torch.arange(-(length - 1), last + 1, device=table.device)
    idx = distances + center
    valid = (idx >= 0) & (idx < table.shape[1])
    rows = table[:, idx.clamp(0, table.shape[1] - 1)]
    return rows * valid.view(1, -1, 1).to(rows.dtype)


def skew_masked(x: torch.Tensor) -> torch.Tensor:
    """``(..., L, L)`` with column ``d + L - 1`` = distance d -> absolute column ``j = i + d``
    (valid for ``j <= i``): pad one column on the left, view as ``(L + 1, L)``, drop the first row."""
    L = x.shape[-1]
    return F.pad(x, (1, 0)).reshape(*x.shape[:-2], L + 1, L)[..., 1:, :]


def skew_unmasked(x: torch.Tensor) -> torch.Tensor:
    """``(..., L, 2L - 1)`` relative columns -> ``(..., L, L)`` absolute: append a zero column, flatten,
    append ``L - 1`` zeros, view as ``(L + 1, 2L - 1)``, keep rows ``:L`` and columns ``L - 1:``."""
    L = x.shape[-2]
    flat = F.pad(x, (0, 1)).flatten(-2)
    flat = F.pad(flat, (0, L - 1))
    return flat.reshape(*x.shape[:-2], L + 1, 2 * L - 1)[..., :L, L - 1:]


def relative_logits(query: torch.Tensor, table: torch.Tensor, sides: str,
                    k_len: int | None = None) -> torch.Tensor:
    """``q_i . E[j - i]`` for every query ``(B, H, Lq, D)`` and key, ``(B, H, Lq, Lk)``, by skewing
    (unscaled). ``sides="left"`` entries with ``j > i`` are undefined (the causal mask removes them).
    Queries sit bottom-right (``i = q + Lk - Lq``); for ``Lq < Lk`` they are padded to ``Lk`` rows."""
    B, H, Lq, D = query.shape
    L = Lq if k_len is None else k_len
    if Lq > L:
        raise ValueError(f"relative_logits: Lq={Lq} > Lk={L}; queries sit at the last Lq key positions.")
    q = F.pad(query, (0, 0, L - Lq, 0))
    rows = used_rows(table, sides, L).to(q.dtype)  # (Ht, L or 2L-1, D)
    rel = torch.einsum("bhld,hrd->bhlr", q, rows.expand(H, -1, -1))
    out = skew_masked(rel) if sides == "left" else skew_unmasked(rel)
    return out[:, :, L - Lq:]


def relative_logits_gather(query: torch.Tensor, table: torch.Tensor, sides: str,
                           k_len: int | None = None) -> torch.Tensor:
    """The definition, pair by pair (``O(Lq Lk D)`` memory): ``q_i . E[j - i + center]``, 0 off the
    table (including ``j > i`` for ``sides="left"``)."""
    B, H, Lq, D = query.shape
    L = Lq if k_len is None else k_len
    table = _per_head(table).to(query.dtype)
    center = table_center(table.shape[1], sides)
    i = torch.arange(Lq, device=query.device)[:, None] + (L - Lq)
    j = torch.arange(L, device=query.device)[None, :]
    idx = j - i + center
    valid = (idx >= 0) & (idx < table.shape[1])
    E = table[:, idx.clamp(0, table.shape[1] - 1)] * valid[..., None].to(table.dtype)  # (Ht, Lq, Lk, D)
    return torch.einsum("bhid,hijd->bhij", query, E.expand(H, -1, -1, -1))


def relative_score_mod(offset: int, center: int, scale: float):
    """``fn(scores, b, h, q, k, query, table)``: adds ``scale * q . E[k - (q + offset) + center]``.

    Works on any broadcastable index grids (the dense engine's 4-D, the blocksparse engine's 6-D
    tiles). Rows that share every index but the innermost query one (a query tile) share one band
    of table rows: ``Q_rows @ E_band^T`` then a gather, so memory is ``rows x band`` (about the score
    tile) plus ``tiles x band x D``, never ``pairs x D``."""

    def score_mod(scores, b, h, q, k, query, table):
        table = _per_head(table)
        qa = q + offset
        d = k - qa
        shape = torch.broadcast_shapes(scores.shape, d.shape, b.shape, h.shape)
        q_dims = [i for i in range(len(shape)) if _size(q, i, len(shape)) > 1]
        inner = max(q_dims) if q_dims else None
        pad = (1,) * (len(shape) - d.dim())
        d = d.view(*pad, *d.shape)
        band_dims = [i for i in range(len(shape)) if i == inner or (_size(q, i, len(shape)) == 1 and d.shape[i] > 1
                                                                   and _size(b, i, len(shape)) == 1
                                                                   and _size(h, i, len(shape)) == 1)]
        lo = d.amin(dim=band_dims, keepdim=True) if band_dims else d
        width = int((d.amax(dim=band_dims, keepdim=True) - lo).max()) + 1 if band_dims else 1
        rows = lo.unsqueeze(-1) + center + torch.arange(width, device=d.device)  # (..., width)
        valid = (rows >= 0) & (rows < table.shape[1])
        ht = h.clamp(max=table.shape[0] - 1).view(*((1,) * (len(shape) - h.dim())), *h.shape)
        band = table[ht.unsqueeze(-1), rows.clamp(0, table.shape[1] - 1)]  # (..., width, D)
        band = band * valid.unsqueeze(-1).to(band.dtype)
        qrows = query[b, h, q.clamp(0, query.shape[2] - 1)]  # (..., D); engines may pass padding rows
        qrows = qrows.view(*((1,) * (len(shape) + 1 - qrows.dim())), *qrows.shape)
        if inner is None:
            qe = (qrows.unsqueeze(-2) @ band.transpose(-1, -2)).squeeze(-2)  # (..., width)
        else:  # the tile's rows form the matrix: (rows, D) @ (D, width), no broadcast copies
            rows_d = qrows.movedim(inner, -2)
            qe = (rows_d @ band.movedim(inner, -3).squeeze(-3).transpose(-1, -2)).movedim(-2, inner)
        return scores + scale * _pick(qe, d - lo).to(scores.dtype)

    return score_mod


def _pick(qe: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """``qe[..., pos]`` broadcast: ``qe (*rows, width)`` holds one band per row, ``pos`` the column of
    every pair. The dims only the keys span are flattened last so the gather never expands ``qe``."""
    full = torch.broadcast_shapes(qe.shape[:-1], pos.shape)
    n = len(full)
    key_dims = [i for i in range(n) if qe.shape[i] == 1 and full[i] > 1]
    row_dims = [i for i in range(n) if i not in key_dims]
    rows = [full[i] for i in row_dims]
    src = qe.expand(*full[:0], *[full[i] if i in row_dims else 1 for i in range(n)], qe.shape[-1])
    src = src.permute(*row_dims, *key_dims, n).reshape(*rows, qe.shape[-1])
    idx = pos.expand(full).permute(*row_dims, *key_dims).reshape(*rows, -1)
    out = torch.gather(src, -1, idx).view(*rows, *[full[i] for i in key_dims])
    return out.permute(*torch.argsort(torch.tensor(row_dims + key_dims)).tolist())


def _size(t: torch.Tensor, dim: int, ndim: int) -> int:
    """Size of ``t`` along ``dim`` of an ``ndim``-dimensional broadcast (leading dims are 1)."""
    lead = ndim - t.dim()
    return 1 if dim < lead else t.shape[dim - lead]
