"""Shifted group attention: LongLoRA's S²-Attn and SinkLoRA's SF-Attn.

**LongLoRA S²-Attn** (Chen et al. 2023, arXiv 2309.12307). Tokens attend within groups of ``G``
tokens; the last ``H // 2`` query heads use groups shifted by ``s = G // 2`` so information flows
between neighbouring groups. Two variants, both read in the official code
(dvlab-research/LongLoRA @ d4eb344, ``llama_attn_replace.py``):

- ``"no_wrap"`` — ``forward_flashattn`` (the flash-attention path since commit 4101fec, 2023-10-03):
  no token moves; the shifted heads' groups are cut by ``cu_seqlens`` at ``s, s + G, s + 2G, ...``,
  so the first and last shifted groups are shorter and nothing wraps (nothing to shift back)::

      group_h(pos) = (pos + phase_h) // G,   phase_h = G - s for shifted heads, 0 otherwise

- ``"roll"`` — ``forward_noflashattn`` (and the first flash path, commit 4cbb61b): the shifted
  heads' q/k/v are rolled by ``-G/2``, attention runs in groups of the rolled sequence, outputs are
  rolled back by ``+G/2``. In original positions, with ``t(pos) = (pos - s) mod L``, query i sees
  key j iff ``t(i) // G == t(j) // G`` (and, in the official causal training, ``t(j) <= t(i)``).
  The group ``t >= L - G`` wraps: tokens ``L - s .. L - 1`` and ``0 .. s - 1``. Its official
  causal form lets the first ``s`` tokens see the last ``s`` keys (future tokens), so it is not
  causal attention: ``attend(..., is_causal=True, variant="roll")`` raises; the exact official
  training mask is ``shifted_groups(G, variant="roll", causal=True)`` passed as ``pattern=`` with
  ``is_causal=False``. The official code needs ``L % G == 0`` and, for the roll to be undone
  exactly, an even ``G`` (``roll(-G//2)`` then ``roll(G//2)`` misaligns outputs by one for odd
  ``G``); attnkit requires both for ``"roll"``.

Official code takes ``group_size_ratio = 1/4`` of the length (``G = int(L / 4)``, ``L % G == 0``);
attnkit takes ``group_size`` in tokens (needed when Lq != Lk, e.g. decoding) or the ratio, and
allows a shorter last group for ``"no_wrap"``. Causal is bottom-right aligned (query q at
``q + Lk - Lq``); groups are fixed in absolute positions, so decoding reproduces the prefill rows.

**SinkLoRA SF-Attn** (Zhang 2024, arXiv 2406.05678). No SF-Attn code exists in the official
repository (Dexter-GT-86/SinkLoRA @ a741094: its attention files are LongLoRA copies and contain no
sink handling; checked). Reconstructed from the abstract, as the spec (§13b) does: the shifted
heads' groups are "returned to their un-shifted state" (the ``no_wrap`` grouping, nothing wraps)
and every group also sees the first ``sinks`` tokens ("sink attention tokens", global attention)::

      visible(i, j) = (group_h(i) == group_h(j) or j < sinks) [and j <= i if causal]

Provisional: whether both head halves get the sinks, and the paper's exact "proportional"
reassembly, could not be verified (paper body unavailable); default ``sinks = 4`` follows
StreamingLLM.
"""

from __future__ import annotations

import torch

from ..errors import OptionError
from .base import Pattern, _to_device
from .tiles import (Span, key_tiles, query_tiles, refine, span, span_present, states, union_covers)

VARIANTS = ("no_wrap", "roll")


class ShiftedGroups(Pattern):
    """Group attention with the last ``heads // 2`` heads shifted by half a group (module doc);
    ``sinks > 0`` adds the first ``sinks`` keys to every group (SinkLoRA)."""

    def __init__(self, *, heads: int, group_size: int | None, group_size_ratio: float,
                 variant: str = "no_wrap", sinks: int = 0, causal: bool = False, name: str = "shifted_groups"):
        self.group_size, self.group_size_ratio = group_size, group_size_ratio
        self.variant, self.sinks, self.causal, self.name = variant, sinks, causal, name
        shifted = torch.arange(heads) >= heads - heads // 2
        self.shifted = shifted if bool(shifted.any()) else shifted[:1]
        self.heads = heads if bool(shifted.any()) else None

    def group(self, q_len: int, k_len: int) -> int:
        """``G`` in tokens (from the ratio of the length when ``group_size`` is None)."""
        if self.group_size is not None:
            return self.group_size
        return max(1, int(k_len * self.group_size_ratio))

    def check(self, q_len, k_len):
        what = f"{self.name}(variant={self.variant!r})"
        if self.group_size is None and q_len != k_len:
            raise OptionError(
                f"{what}: group_size=None takes G from group_size_ratio={self.group_size_ratio} of the "
                f"length, which is ambiguous with Lq={q_len} != Lk={k_len} (and would change while "
                "decoding); pass group_size=G in tokens.")
        if self.variant == "roll":
            G = self.group(q_len, k_len)
            if q_len != k_len or k_len % G or G % 2:
                raise OptionError(
                    f"{what}: the roll variant wraps around the whole sequence: it needs self-attention "
                    f"(got Lq={q_len}, Lk={k_len}), a length divisible by the group (G={G}) and an even "
                    "G (as the official code). Use variant='no_wrap' otherwise.")

    def params(self, q_len, k_len):
        G = self.group(q_len, k_len)
        half = G // 2
        return {"offset": k_len - q_len, "group": G, "length": k_len, "sinks": self.sinks,
                "causal": self.causal, "roll": self.variant == "roll",
                "phase": torch.where(self.shifted, G - half, 0), "roll_by": torch.where(self.shifted, half, 0)}

    def rule(self, b, h, q, k, p):
        qa = q + p["offset"]
        if p["roll"]:
            tq, tk = ((x - p["roll_by"][h]) % p["length"] for x in (qa, k))
            keep = tq // p["group"] == tk // p["group"]
            return keep & (tk <= tq) if p["causal"] else keep
        phase = p["phase"][h]
        keep = (torch.div(qa + phase, p["group"], rounding_mode="floor")
                == torch.div(k + phase, p["group"], rounding_mode="floor")) | (k < p["sinks"])
        return keep & (k <= qa) if p["causal"] else keep

    def _plan(self, q_len, k_len, block_q, block_k, device):
        p = _to_device(self.params(q_len, k_len), device)
        qf, ql = (x[:, None] for x in query_tiles(q_len, k_len, block_q, device))
        ks, ke = key_tiles(k_len, block_k, device)
        phase, G, causal = p["phase"].view(-1, 1, 1), p["group"], p["causal"]

        def group_bounds(qa):
            lo = torch.div(qa + phase, G, rounding_mode="floor") * G - phase
            return lo, (torch.minimum(lo + G - 1, qa) if causal else lo + G - 1)

        def sink_bounds(qa):
            hi = torch.full_like(qa, p["sinks"] - 1)
            return torch.zeros_like(qa), (torch.minimum(hi, qa) if causal else hi)

        groups, sinks = span(group_bounds, qf, ql), span(sink_bounds, qf, ql)
        present = span_present(groups, ks, ke) | span_present(sinks, ks, ke)
        tiles = states(present, union_covers(groups, sinks, ks, ke)).unsqueeze(0)
        if not p["roll"]:
            return tiles
        # roll = the no_wrap groups + the wrapped group's two cross rectangles (shifted heads);
        # their union may fill a tile the max misses, so undecided tiles are evaluated exactly
        L, s = p["length"], G // 2
        wrap = _rectangle(qf, ql, ks, ke, (0, s - 1), (L - s, L - 1))
        if not causal:
            wrap = torch.maximum(wrap, _rectangle(qf, ql, ks, ke, (L - s, L - 1), (0, s - 1)))
        wrap = wrap * p["roll_by"].view(1, -1, 1, 1).gt(0)
        tiles = torch.maximum(tiles, wrap.to(torch.int8))
        return refine(self, tiles, q_len, k_len, block_q, block_k, device)

    def describe(self):
        G = f"G={self.group_size}" if self.group_size is not None else f"G={self.group_size_ratio:g}*L"
        extra = f", sinks={self.sinks}" if self.sinks else ""
        variant = f", {self.variant}" if self.name == "shifted_groups" else ""
        return f"{self.name}({G}{variant}{extra}{', causal' if self.causal else ''})"


def _rectangle(qf, ql, ks, ke, rows, cols) -> torch.Tensor:
    """Tile states of the block ``rows x cols`` (inclusive bounds), ``(nQ, nK)``."""
    r0, r1 = rows
    c0, c1 = cols
    full_span = Span(*(torch.full_like(qf, x) for x in (c0, c1, c0, c1)))
    rows_meet = (torch.clamp(qf, min=r0) <= torch.clamp(ql, max=r1))
    rows_in = (qf >= r0) & (ql <= r1)
    present = rows_meet & span_present(full_span, ks, ke)
    return states(present, rows_in & (ks >= c0) & (ke <= c1))


def _check_group(name: str, group_size, group_size_ratio) -> None:
    if group_size is not None and group_size < 1:
        raise OptionError(f"{name}: group_size={group_size!r} is invalid; it must be >= 1 token (or None "
                          "to use group_size_ratio of the length).")
    if not 0 < group_size_ratio <= 1:
        raise OptionError(f"{name}: group_size_ratio={group_size_ratio!r} is invalid; it must be in (0, 1] "
                          "(the official default is 1/4).")


def shifted_groups(group_size: int | None = None, *, heads: int, group_size_ratio: float = 0.25,
                   variant: str = "no_wrap", causal: bool = True) -> ShiftedGroups:
    """LongLoRA S²-Attn for ``heads`` query heads: groups of ``group_size`` tokens (default
    ``group_size_ratio`` of the length, self-attention only), the last ``heads // 2`` heads shifted by
    half a group. ``variant``: ``"no_wrap"`` (flash path) or ``"roll"`` (the original cyclic shift;
    with ``causal=True`` it is the official *rolled* causal mask, which sees future tokens)."""
    _check_group("shifted_groups", group_size, group_size_ratio)
    if variant not in VARIANTS:
        raise OptionError(f"shifted_groups: variant={variant!r} is invalid; use one of {VARIANTS}.")
    return ShiftedGroups(heads=heads, group_size=group_size, group_size_ratio=group_size_ratio,
                         variant=variant, causal=causal)


def sink_groups(group_size: int | None = None, *, heads: int, sinks: int = 4,
                group_size_ratio: float = 0.25, causal: bool = True) -> ShiftedGroups:
    """SinkLoRA SF-Attn (reconstructed, see module doc): LongLoRA's no-wrap shifted groups plus the
    first ``sinks`` keys visible to every query."""
    _check_group("sink_groups", group_size, group_size_ratio)
    if sinks < 0:
        raise OptionError(f"sink_groups: sinks={sinks!r} is invalid; it must be >= 0 (the first keys "
                          "every query sees).")
    return ShiftedGroups(heads=heads, group_size=group_size, group_size_ratio=group_size_ratio,
                         sinks=sinks, causal=causal, name="sink_groups")


__all__ = ["ShiftedGroups", "shifted_groups", "sink_groups"]
