"""``vmoba``: MoBA for video diffusion transformers (Wu et al. 2025, VMoBA, arXiv 2506.23858).

Tokens lie on a ``grid = (frames, height, width)`` in row-major order. Keys are cut into chunks
by one of three partitions, which the paper cycles across layers (``partition=None``: layer
``l`` uses 1-D, 2-D, 3-D for ``l % 3 = 0, 1, 2``; pass ``layer=``)::

    1d   frames_per_chunk consecutive frames   (a chunk is consecutive tokens; the last may be shorter)
    2d   tile = (th, tw): one spatial tile across all frames
    3d   cube = (tt, th, tw): a spatio-temporal cube

Tokens are reordered so every chunk is contiguous (``(nth, ntw, t, th, tw)`` for 2-D,
``(ntt, nth, ntw, tt, th, tw)`` for 3-D), attention runs there, and outputs return to the grid
order. Then MoBA's router, bidirectional (batch b, query head h, query s; its kv head's keys)::

    gate      g[c, h, s] = q_s · mean key of chunk c                      (no softmax scale)
    own       the chunk of s                                              (always kept)
    top-k     keep the k best chunks per query (scope "query"), the k·S best (chunk, query)
              pairs per head ("head", the paper's global selection) or k·H·S per sample ("all")
    threshold min-max normalise g within a group (scope "query": one query's chunks; "head": a
              head's (chunk, query) pairs; "block": a chunk's (head, query) pairs; "all": everything),
              need = max(0, threshold - share of the own-chunk entries), then keep the best other
              entries until their cumulative share reaches need (the first one always)
    M[s, j]   chunk(j) kept for (h, s)
    out       softmax(q kᵀ · scale, masked by M) v                      (exact, one softmax)

``density`` selects top-k with ``k = ceil(density * C)`` of the ``C`` chunks (per query, or
``k·S`` per head, ``k·H·S`` in all), so ``density=1`` is dense attention. ``select_mode``
defaults to ``"threshold"`` (the official default, threshold 0.25) unless ``top_k`` or
``density`` is given.

Confirmed in KwaiVGI/VMoBA @ 4da72ff ``src/vmoba.py``: ``process_moba_input`` /
``process_moba_output`` (the reorders, the divisibility asserts for 2-D/3-D, the 1-D chunk of
``frames * height * width`` tokens), ``calc_chunks`` (every chunk selectable, the last may be
shorter), mean keys over real tokens, gate in float32 without scale, self chunk ``+1e9`` in top-k
mode, ``moba_topk * S`` / ``moba_topk * H * S`` for the global top-k scopes (no "block" top-k),
``_select_threshold_{query_head, head_global, block, overall}`` (min-max normalisation with
``eps=1e-6``, the ``remain_ratio`` rule, the cumulative cut with the first entry always taken),
defaults ``select_mode='threshold', simsum_threshold=0.25, threshold_type='query_head'``,
non-causal attention. Not confirmed in code: the layer order of the partitions (the repository
has no model file; 1-D, 2-D, 3-D by ``layer % 3`` follows the spec's reading of the paper) and
the chunk sizes (``src/cal_theo_flops.py`` counts 7 / 40 / 60 chunks for 1-D / 2-D / 3-D layers);
attnkit's default sizes cut each axis in about 4 (the largest divisor at most a quarter of it).
Differences: the official code selects over a packed batch (the "head" and "all" groups span all
samples); here each sample selects alone. When nothing beyond the own chunks is selected the
official code returns FULL attention (a shortcut); attnkit keeps the own chunks (the mask it
states). Under GQA each query head routes with its kv head's mean keys (official: ``H == Hkv``).
"""

from __future__ import annotations

import math

import torch

from ...errors import OptionError
from ...options import Option
from ...patterns.selection import BlockSelection, PermutedPattern
from ...registry import MethodInfo, options, register
from ..pattern_method import BLOCK_SIZE
from .base import PER_QUERY_BACKENDS, DynamicMethod, by_query_head, density_option, key_means, top_k_mask
from ..patterns._grid import bench_grid

PARTITIONS = ("1d", "2d", "3d")
SCOPES = ("query", "head", "block", "all")
EPS = 1e-6


@register
class VMoBA(DynamicMethod):
    info = MethodInfo(
        name="vmoba", family="D", kind="exact", patterns=frozenset({"noncausal-self"}), seed=(37,),
        summary="VMoBA: MoBA on video grids with 1-D/2-D/3-D chunks, top-k or cumulative-threshold routing",
        backends=PER_QUERY_BACKENDS,
        options=options(
            Option("grid", "ints", None, "token grid (frames, height, width) in row-major order; "
                   "(height, width) means one frame", low=1, nullable=True),
            Option("partition", "choice", None, "chunk shape: '1d' frames, '2d' spatial tiles, '3d' cubes "
                   "(None: by layer % 3)", choices=PARTITIONS, nullable=True),
            Option("layer", "int", 0, "layer index choosing the partition when partition=None", low=0),
            Option("frames_per_chunk", "int", None, "1-D chunk length in frames (default: about T/4)",
                   low=1, nullable=True),
            Option("tile", "ints", None, "2-D chunk (height, width), dividing the grid (default: about "
                   "a quarter of each)", low=1, length=2, nullable=True),
            Option("cube", "ints", None, "3-D chunk (frames, height, width), dividing the grid (default: "
                   "about a quarter of each)", low=1, length=3, nullable=True),
            Option("select_mode", "choice", None, "'threshold' (cumulative gate share) or 'topk' (None: "
                   "threshold unless top_k or density is given)", choices=("threshold", "topk"), nullable=True),
            Option("scope", "choice", "query", "selection group: per 'query', per 'head' (global), per "
                   "'block' (threshold only) or 'all' (threshold_type)", choices=SCOPES),
            Option("threshold", "float", 0.25, "gate share to reach, own chunk included (simsum_threshold)",
                   low=0.0, high=1.0, open_low=True),
            Option("top_k", "int", None, "chunks per query, own included (moba_topk; per head: k·S pairs)",
                   low=1, nullable=True),
            density_option("the chunks (top-k mode with k = ceil(density * chunks))"),
            BLOCK_SIZE),
        references="Wu et al. 2025, VMoBA (arXiv 2506.23858); github.com/KwaiVGI/VMoBA src/vmoba.py")

    # -- options ----------------------------------------------------------------------------------
    def check_options(self, call):
        self._layout(call)
        self._mode(call.options)

    def _mode(self, o) -> str:
        name = self.info.name
        if o["top_k"] is not None and o["density"] is not None:
            raise OptionError(f"method {name!r}: pass either density={o['density']} or top_k={o['top_k']}, not both.")
        budgeted = o["top_k"] is not None or o["density"] is not None
        mode = o["select_mode"] or ("topk" if budgeted else "threshold")
        if mode == "threshold" and budgeted:
            raise OptionError(f"method {name!r}: select_mode='threshold' takes no top_k/density "
                              f"(got top_k={o['top_k']}, density={o['density']}); use select_mode='topk'.")
        if mode == "topk" and o["scope"] == "block":
            raise OptionError(f"method {name!r}: scope='block' exists for select_mode='threshold' only "
                              "(as in the official code); use scope='query', 'head' or 'all'.")
        return mode

    def _layout(self, call):
        """``(order or None, chunk length)`` of the chosen partition; checks the grid."""
        o, name = call.options, self.info.name
        grid = o["grid"]
        if grid is None:
            raise OptionError(f"method {name!r} needs grid=(frames, height, width) with "
                              f"frames*height*width = L = {call.q_len}.")
        grid = (grid,) if isinstance(grid, int) else tuple(grid)
        if len(grid) == 2:
            grid = (1, *grid)
        if len(grid) != 3 or min(grid) < 1 or math.prod(grid) != call.q_len:
            raise OptionError(f"method {name!r}: grid={o['grid']} must be (frames, height, width) or "
                              f"(height, width) of positive sizes whose product is L = {call.q_len}.")
        T, Hh, Ww = grid
        part = o["partition"] or PARTITIONS[o["layer"] % 3]
        if part == "1d":
            frames = o["frames_per_chunk"] or _quarter(T)
            return None, min(frames, T) * Hh * Ww
        if part == "2d":
            th, tw = o["tile"] or (_quarter(Hh), _quarter(Ww))
            _divides(name, "tile", (th, tw), (Hh, Ww))
            order = torch.arange(call.q_len).view(T, Hh // th, th, Ww // tw, tw).permute(1, 3, 0, 2, 4)
            return order.reshape(1, -1), T * th * tw
        tt, th, tw = o["cube"] or (_quarter(T), _quarter(Hh), _quarter(Ww))
        _divides(name, "cube", (tt, th, tw), grid)
        order = torch.arange(call.q_len).view(T // tt, tt, Hh // th, th, Ww // tw, tw).permute(0, 2, 4, 1, 3, 5)
        return order.reshape(1, -1), tt * th * tw

    # -- selection --------------------------------------------------------------------------------
    def select(self, call):
        o = call.options
        mode = self._mode(o)
        order, size = self._layout(call)
        q, k = call.query.detach(), call.key.detach()
        if order is not None:
            order = order.to(call.device)
            q, k = q.index_select(2, order[0]), k.index_select(2, order[0])
        means = by_query_head(key_means(k, size), call.group)  # (B, H, C, D)
        gate = q.to(means.dtype) @ means.transpose(-1, -2)  # (B, H, S, C)
        S, C = gate.shape[-2:]
        own = torch.arange(S, device=call.device)[:, None] // size == torch.arange(C, device=call.device)
        own = own.expand(gate.shape)
        if mode == "topk":
            kk = min(o["top_k"], C) if o["top_k"] is not None else max(1, math.ceil(o["density"] * C - 1e-9))
            kept = _top_k(gate.masked_fill(own, float("inf")), o["scope"], kk)
        else:
            kept = _threshold(gate, own, o["scope"], o["threshold"])
        tiles = kept | own
        run = BlockSelection(tiles, 1, size)
        details = {"chunk_size": size, "tiles": tiles, "mode": mode}
        if order is None:
            return self.selection(call, run, details=details)
        return self.selection(call, PermutedPattern(run, order, order), run_pattern=run,
                              order=(order, order), details=details)

    def bench_options(self, q_len, k_len, density=None):
        """A (frames, height, width) layout; ``density`` is the share of key chunks kept."""
        opts = {"grid": bench_grid(q_len, 3)}
        if density is not None:
            opts["density"] = density
        return opts

    def sample_options(self, rng, q_len, k_len):
        T = int(rng.choice(_divisors(q_len)))
        Hh = int(rng.choice(_divisors(q_len // T)))
        Ww = q_len // (T * Hh)
        part = PARTITIONS[int(rng.integers(0, 3))]
        opts = {"grid": (T, Hh, Ww), "partition": part}
        if part == "1d":
            opts["frames_per_chunk"] = int(rng.integers(1, T + 1))
        elif part == "2d":
            opts["tile"] = (int(rng.choice(_divisors(Hh))), int(rng.choice(_divisors(Ww))))
        else:
            opts["cube"] = tuple(int(rng.choice(_divisors(n))) for n in (T, Hh, Ww))
        if rng.random() < 0.5:
            opts["threshold"] = float(rng.choice([0.1, 0.25, 0.6, 1.0]))
            opts["scope"] = SCOPES[int(rng.integers(0, 4))]
        else:
            opts["scope"] = ("query", "head", "all")[int(rng.integers(0, 3))]
            if rng.random() < 0.5:
                opts["density"] = float(rng.choice([0.1, 0.3, 1.0]))
            else:
                opts["top_k"] = int(rng.integers(1, 4))
        return opts


def _quarter(n: int) -> int:
    """The largest divisor of n that is at most max(1, n // 4): about four chunks per axis."""
    return max(d for d in _divisors(n) if d <= max(1, n // 4))


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _divides(method: str, name: str, chunk: tuple[int, ...], grid: tuple[int, ...]) -> None:
    if any(g % c for c, g in zip(chunk, grid)):
        raise OptionError(f"method {method!r}: {name}={chunk} must divide the grid {grid} axis by axis "
                          f"(as in the official code); pick sizes among the divisors {[_divisors(g) for g in grid]}.")


def _groups(x: torch.Tensor, scope: str) -> torch.Tensor:
    """``(B, H, S, C)`` -> ``(groups..., members)`` for a selection scope."""
    B, H, S, C = x.shape
    if scope == "query":
        return x
    if scope == "head":
        return x.reshape(B, H, S * C)
    if scope == "block":
        return x.permute(0, 3, 1, 2).reshape(B, C, H * S)
    return x.reshape(B, H * S * C)


def _ungroup(x: torch.Tensor, scope: str, shape) -> torch.Tensor:
    B, H, S, C = shape
    if scope == "block":
        return x.view(B, C, H, S).permute(0, 2, 3, 1)
    return x.reshape(B, H, S, C)


def _top_k(gate: torch.Tensor, scope: str, k: int) -> torch.Tensor:
    per = {"query": 1, "head": gate.shape[2], "all": gate.shape[1] * gate.shape[2]}[scope]
    return _ungroup(top_k_mask(_groups(gate, scope), k * per), scope, gate.shape)


def _threshold(gate: torch.Tensor, own: torch.Tensor, scope: str, threshold: float) -> torch.Tensor:
    """The official cumulative-share rule within each group (see the module docstring)."""
    g, s = _groups(gate, scope), _groups(own, scope)
    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    span = hi - lo
    norm = (g - lo) / torch.where(span <= EPS, torch.ones_like(span), span)
    total = norm.sum(-1, keepdim=True)
    need = torch.clamp(threshold - (norm * s).sum(-1, keepdim=True) / (total + EPS), min=0.0)
    others = norm.masked_fill(s, 0.0)
    order = torch.argsort(others.masked_fill(s, -1.0), dim=-1, descending=True, stable=True)
    share = torch.gather(others, -1, order).cumsum(-1) / (total + EPS)
    reached = share >= need
    cut = torch.where(reached.any(-1, keepdim=True), reached.to(torch.int8).argmax(-1, keepdim=True),
                      torch.full_like(need, g.shape[-1] - 1, dtype=torch.long))
    chosen = torch.arange(g.shape[-1], device=g.device) <= cut
    kept = torch.zeros_like(s).scatter(-1, order, chosen)
    return _ungroup(kept, scope, gate.shape)


__all__ = ["VMoBA"]
