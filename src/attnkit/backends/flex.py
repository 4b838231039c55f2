"""The ``flex`` engine: a Pattern run by ``torch.nn.attention.flex_attention``, compiled.

What reaches the kernel (Dong et al. 2024, "Flex Attention", arXiv:2412.05496; torch's
``torch/nn/attention/flex_attention.py``):

- the ``BlockMask`` comes from the pattern's analytic block plan (:meth:`Pattern.block_plan`),
  never from ``create_block_mask`` over ``Lq x Lk``: partial tiles go to ``kv_num_blocks`` /
  ``kv_indices`` (``mask_mod`` evaluated there), full tiles to ``full_kv_*`` (``mask_mod`` skipped),
  and the query-side lists for the backward pass are the transposed plan;
- ``mask_mod`` is the pattern's ``rule`` with the numbers of ``params(Lq, Lk)`` passed as 0-d
  tensors (ints as int64, floats in the default float dtype, as eager torch would promote a Python
  number), so every configuration of a pattern family runs the same compiled kernel and no
  configuration can reuse another's mask. Bools, strings and None stay Python constants: they
  choose code paths, and each value gets its own kernel (``causal`` on/off);
- the call's ``attn_mask`` (bool: into ``mask_mod``, full tiles demoted to partial; float: added in
  ``score_mod``), a non-default ``scale`` (a tensor ratio in ``score_mod``), and the MaskSpec's
  ``score_mod(scores, b, h, q, k, *tensors)``, which flex evaluates element by element under
  ``vmap`` (broadcasting torch code works unchanged).

One compiled function per *variant* (pattern family = class tree, its static parameters, dtype,
head dims, GQA, grad, mask kind, score_mod), each with its own code object so dynamo's recompile
limit applies per variant; within a variant only shapes change (static once, then dynamic), and
which of B, H, L, blocks equal 1 is part of the variant (dynamo specializes on size 1).

Nothing falls back silently: a graph break raises (``fullgraph=True``), dynamo's recompile limit
raises, an eager run of the kernel function (limit reached in a torch that falls back, or
``torch.compiler`` set to eager) raises, and a recompile at input shapes the variant already ran —
a rule or score_mod reading a configuration number as a Python constant — raises: all as
:class:`~attnkit.errors.BackendUnavailableError` saying why. Rows with no visible key are 0 (flex
sets their normalizer to 1 and their log-sum-exp to -inf, whose backward gives 0 gradients).
On CPU (torch <= 2.13) FlexAttention is forward-only and compiles for ~25 s, so auto selection
skips it there; on CUDA it is the first mask engine.

Token order: a self-attention pattern may offer a tiled order (grid patterns: every block of 128
tokens a compact box of the grid, :mod:`attnkit.patterns.grid_order`); the engine then moves
q, k, v into it, runs the reordered pattern and moves the output back
(:mod:`attnkit.backends.reorder`; the moves are part of the call). ``describe(call, spec)`` (and
``ak.explain(...).details``) says which order and block mask a call runs with.

Settings (performance only, :mod:`attnkit.backends.flex_tuning`): ``kernel_options`` (FlexAttention's
Triton knobs), ``kv_block`` (key-side sparse block), ``token_tiling``; set them with
``configure(...)`` or temporarily with ``with engine.tuned(...):``. Unset, the measured defaults apply
(``flex_tuning``): 64-row forward tiles for narrow plans, 64-key blocks for forward-only tiled grids,
64 x 64 blocks for narrow forward-only plans where the call names no ``block_size``; blocks below
128 are forward-only on CUDA (FlexAttention's backward tiles need 128). Python work per call is a few
dictionary lookups: parameters, token orders and block masks are cached per (pattern
configuration, lengths, blocks, device).
"""

from __future__ import annotations

import math
import time
import types
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from ..call import AttentionCall
from ..errors import BackendUnavailableError, OptionError
from ..patterns.base import Pattern
from ..patterns.grid_order import TiledGrid
from .flex_inputs import (FlexBlocks, as_tensor, build_blocks, family_key, leaves, map_leaves, probe_rule,
                          static_key, value_key)
from .flex_tuning import (check_kernel_options, check_kv_block, default_blocks, default_kernel_options,
                          default_kv_block)
from .mask_spec import DEFAULT_BLOCK, MaskSpec
from .reorder import Layout, Layouts, offers_order

CACHE_ENTRIES = 64  # parameter tensors and block masks kept per engine (LRU)
CUDA_BLOCK_MULTIPLE = 128  # flex's Triton tiles must divide the sparse block
SMALL_CUDA_BLOCKS = (16, 32, 64)  # forward only: the engine gives such blocks forward tiles of their size


# -- the compiled kernel ---------------------------------------------------------------------
class _RanEagerly(RuntimeError):
    """Raised by the kernel function when it runs outside dynamo (never traced into a graph)."""


def _flex_kernel(q, k, v, blocks, pattern, params, batch_rule, head_rule, attn_mask, ratio,
                 score_mod, mod_tensors, gqa, block, kernel_options):
    """The function compiled per variant. Python arguments (pattern, flags, score_mod, the block
    pair, kernel options as ``(name, value)`` pairs) are constants of the variant; tensors (q, k,
    v, blocks, params, attn_mask, ratio, mod_tensors) are graph inputs."""
    if not torch.compiler.is_compiling():
        raise _RanEagerly()
    from torch.nn.attention.flex_attention import BlockMask, flex_attention

    q_len, k_len = q.shape[-2], k.shape[-2]
    bool_mask = attn_mask is not None and attn_mask.dtype == torch.bool
    float_mask = attn_mask is not None and not bool_mask

    def mask_index(b, h, qi, ki):
        am = attn_mask
        return am[b if am.shape[0] > 1 else torch.zeros_like(b), h if am.shape[1] > 1 else torch.zeros_like(h),
                  qi if am.shape[2] > 1 else torch.zeros_like(qi), ki if am.shape[3] > 1 else torch.zeros_like(ki)]

    def mask_mod(b, h, qi, ki):
        b, h, qi, ki = b.long(), h.long(), qi.long(), ki.long()
        rb = b if batch_rule else torch.zeros_like(b)
        rh = h if head_rule else torch.zeros_like(h)
        keep = pattern.rule(rb, rh, qi, ki, params)
        if bool_mask:
            keep = keep & mask_index(b, h, qi, ki)
        return keep

    modded = ratio is not None or float_mask or score_mod is not None

    def full_score_mod(s, b, h, qi, ki):
        b, h, qi, ki = b.long(), h.long(), qi.long(), ki.long()
        if ratio is not None:
            s = s * ratio
        if float_mask:
            s = s + mask_index(b, h, qi, ki).to(s.dtype)
        if score_mod is not None:
            s = score_mod(s, b, h, qi, ki, *mod_tensors)
        return s

    kv_num, kv_idx, fkv_num, fkv_idx, q_num, q_idx, fq_num, fq_idx = blocks
    block_mask = BlockMask(
        seq_lengths=(q_len, k_len), kv_num_blocks=kv_num, kv_indices=kv_idx,
        full_kv_num_blocks=fkv_num, full_kv_indices=fkv_idx, q_num_blocks=q_num, q_indices=q_idx,
        full_q_num_blocks=fq_num, full_q_indices=fq_idx, BLOCK_SIZE=block, mask_mod=mask_mod)
    return flex_attention(q, k, v, score_mod=full_score_mod if modded else None, block_mask=block_mask,
                          enable_gqa=gqa, kernel_options=dict(kernel_options) if kernel_options else None)


class _Variant:
    """One compiled kernel function (own code object) and its compile log.

    ``seen`` holds the concrete input shapes of calls that ran. A compile requested for shapes
    already seen cannot come from the shapes: a guard on a Python value failed, i.e. a rule or
    score_mod read a configuration number outside ``params`` — in strict mode that raises instead
    of compiling once per configuration."""

    def __init__(self, key: tuple, index: int, strict: bool):
        self.key = key
        name = f"attnkit_flex_{index}"
        code = _flex_kernel.__code__.replace(co_name=name)
        if hasattr(code, "co_qualname"):
            code = code.replace(co_qualname=name)
        fn = types.FunctionType(code, _flex_kernel.__globals__, name)
        self.strict = strict
        self.compiles = 0
        self.seconds = 0.0
        self.seen: set = set()
        self.current = None
        self.fn = torch.compile(fn, backend=self._backend, fullgraph=True)

    def __call__(self, shapes: tuple, *args):
        self.current = shapes
        out = self.fn(*args)
        self.seen.add(shapes)
        return out

    def _backend(self, gm, example_inputs):
        from torch._inductor.compile_fx import compile_fx

        if self.strict and self.current in self.seen:
            raise BackendUnavailableError(
                f"the flex kernel for {self.key[0][0]} would recompile at input shapes it already ran "
                f"(compile #{self.compiles + 1}): the pattern's rule or score_mod reads a configuration "
                "number as a Python constant instead of from params(q_len, k_len) / the score_mod "
                "tensors, so every configuration would compile again. Fix the pattern, or use "
                "backend='blocksparse' (or FlexEngine(strict=False)).")
        start = time.perf_counter()
        try:
            return compile_fx(gm, example_inputs)
        finally:
            self.compiles += 1
            self.seconds += time.perf_counter() - start


def _shapes(tensors, params_shapes: tuple, blocks: FlexBlocks) -> tuple:
    """The concrete input shapes (and grad flags) of one call: what a compile may depend on."""
    return (tuple((tuple(t.shape), t.requires_grad) if t is not None else None for t in tensors),
            params_shapes, blocks.shapes)


def _our_error(err: BaseException) -> BackendUnavailableError | None:
    """A BackendUnavailableError raised inside the compiler, which dynamo wraps."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, BackendUnavailableError):
            return err
        seen.add(id(err))
        err = getattr(err, "inner_exception", None) or err.__cause__ or err.__context__
    return None


def _global_state(device: torch.device) -> tuple:
    """Global settings dynamo guards on, so that they select a variant instead of recompiling one."""
    kind = device.type
    autocast = torch.is_autocast_enabled(kind) if kind in ("cuda", "cpu") else False
    return (autocast, torch.get_autocast_dtype(kind) if autocast else None,
            torch.are_deterministic_algorithms_enabled(), torch.get_default_dtype())


# -- the engine ------------------------------------------------------------------------------
def flex_unavailable() -> str | None:
    """Why this torch cannot run FlexAttention at all (None when it can)."""
    try:
        import torch.nn.attention.flex_attention  # noqa: F401
    except ImportError:
        return f"this torch ({torch.__version__}) has no torch.nn.attention.flex_attention (needs >= 2.5)"
    if not torch._dynamo.is_dynamo_supported():
        return f"torch.compile (dynamo) is not supported on this Python / torch {torch.__version__}"
    return None


def _needs_grad(call: AttentionCall, spec: MaskSpec) -> bool:
    ts = [call.query, call.key, call.value, *spec.mod_tensors]
    if call.attn_mask is not None and call.attn_mask.is_floating_point():
        ts.append(call.attn_mask)
    return torch.is_grad_enabled() and any(t.requires_grad for t in ts)


@dataclass
class FlexEngine:
    """FlexAttention over a pattern's block plan (see the module docstring).

    ``strict`` (default True) raises when a variant would recompile at input shapes it already ran.
    ``kernel_options`` (None: ``default_kernel_options``), ``kv_block`` and ``token_tiling`` are
    performance settings (module doc). ``stats()`` lists the compiled variants with their compile
    counts and seconds."""

    name: str = "flex"
    compiles: bool = True  # compile-heavy: generic CPU tests skip it (tests/helpers.py)
    strict: bool = True
    kernel_options: dict | None = None
    kv_block: int | None = None
    token_tiling: bool = True
    _variants: dict = field(default_factory=dict, repr=False)
    _params: OrderedDict = field(default_factory=OrderedDict, repr=False)
    _blocks: OrderedDict = field(default_factory=OrderedDict, repr=False)
    _probes: dict = field(default_factory=dict, repr=False)
    _layouts: Layouts = field(default_factory=Layouts, repr=False)
    _pairs: dict = field(default_factory=dict, repr=False)  # configuration -> (block pair, its params)

    def __post_init__(self):
        self.configure(kernel_options=self.kernel_options, kv_block=self.kv_block, token_tiling=self.token_tiling)

    # -- settings -----------------------------------------------------------------------
    def configure(self, **settings) -> None:
        """Set ``kernel_options``, ``kv_block`` and / or ``token_tiling`` (checked; OptionError)."""
        unknown = set(settings) - {"kernel_options", "kv_block", "token_tiling"}
        if unknown:
            raise OptionError(f"FlexEngine.configure: unknown setting(s) {sorted(unknown)}; the settings are "
                              "kernel_options, kv_block, token_tiling.")
        if "kernel_options" in settings:
            check_kernel_options(settings["kernel_options"])
            options = settings["kernel_options"]
            self.kernel_options = None if options is None else dict(options)
        if "kv_block" in settings:
            self.kv_block = check_kv_block(settings["kv_block"])
        if "token_tiling" in settings:
            if not isinstance(settings["token_tiling"], bool):
                raise OptionError(f"FlexEngine token_tiling={settings['token_tiling']!r} must be True or False.")
            self.token_tiling = settings["token_tiling"]

    @contextmanager
    def tuned(self, **settings):
        """``with engine.tuned(kernel_options={...}, kv_block=64):`` — settings for the block only."""
        before = {"kernel_options": self.kernel_options, "kv_block": self.kv_block, "token_tiling": self.token_tiling}
        self.configure(**settings)
        try:
            yield self
        finally:
            self.configure(**before)

    def _kernel_options(self, call: AttentionCall, blocks: FlexBlocks) -> tuple:
        options = self.kernel_options
        if options is None:
            options = default_kernel_options(call.device.type, call.dtype, call.head_dim, blocks.row_keys,
                                             (blocks.block, blocks.block_k))
        return check_kernel_options(options)

    def _block_pair(self, call: AttentionCall, spec: MaskSpec) -> tuple[int, int]:
        """(query block, key block): the call's ``block_size`` (or the default) and ``kv_block``,
        else the measured defaults (``flex_tuning``: 64-key blocks for forward-only tiled grids, 64 x 64
        for narrow forward-only plans); the choice is cached per configuration."""
        kv_block = self.kv_block
        if kv_block is not None:
            return spec.block, kv_block
        needs_grad = _needs_grad(call, spec)
        tiled = isinstance(spec.pattern, TiledGrid) or (self.token_tiling and offers_order(spec.pattern))
        pair = (spec.block, default_kv_block(call.device.type, spec.block, tiled, needs_grad) or spec.block)
        if (spec.block_fixed or spec.block != DEFAULT_BLOCK or call.device.type != "cuda" or needs_grad
                or self.kernel_options is not None):  # a user's tiles may not divide 64
            return pair
        raw = spec.pattern.params(call.q_len, call.k_len)
        key = (family_key(spec.pattern), spec.pattern.describe(), value_key(leaves(raw)), call.q_len, call.k_len,
               str(call.device), call.dtype, call.head_dim, pair, self.token_tiling, call.attn_mask is not None,
               spec.score_mod is not None)
        hit = self._pairs.get(key)
        if hit is None:
            row_keys = self._blocks_at(call, spec, pair).row_keys
            hit = self._pairs[key] = (default_blocks(call.device.type, call.dtype, call.head_dim, needs_grad, row_keys)
                                      or pair, raw)  # raw keeps the tensor ids in the key valid
            if len(self._pairs) > CACHE_ENTRIES:
                self._pairs.pop(next(iter(self._pairs)))
        return hit[0]

    # -- selection ----------------------------------------------------------------------
    def can_run(self, call: AttentionCall, spec: MaskSpec) -> str | None:
        why = flex_unavailable()
        if why:
            return why
        dev = call.device.type
        if dev not in ("cuda", "cpu"):
            return f"FlexAttention runs here on CUDA and CPU; the inputs are on {call.device}"
        if dev == "cuda":
            from torch.utils._triton import has_triton

            if not has_triton():
                return "FlexAttention on CUDA needs Triton, which is not installed"
            if call.head_dim < 16 or call.value_dim < 16:
                return (f"FlexAttention's Triton kernel needs head dims >= 16; got D={call.head_dim}, "
                        f"Dv={call.value_dim}")
            if spec.block % CUDA_BLOCK_MULTIPLE and spec.block not in SMALL_CUDA_BLOCKS:
                return (f"block_size={spec.block}: FlexAttention's CUDA tiles need a multiple of "
                        f"{CUDA_BLOCK_MULTIPLE} (e.g. block_size=128), or one of {SMALL_CUDA_BLOCKS} "
                        "for forward-only calls")
            if spec.block < CUDA_BLOCK_MULTIPLE and _needs_grad(call, spec):
                return (f"block_size={spec.block}: FlexAttention's backward pass needs query blocks that its "
                        f"default tiles (BLOCK_M2 = {CUDA_BLOCK_MULTIPLE} on sm90) divide; use "
                        f"block_size={CUDA_BLOCK_MULTIPLE} for training, or run under torch.no_grad()")
            if self.kv_block is not None and self.kv_block < CUDA_BLOCK_MULTIPLE and _needs_grad(call, spec):
                return (f"kv_block={self.kv_block}: FlexAttention's backward pass needs key blocks that its "
                        f"default tiles (BLOCK_N1 = {CUDA_BLOCK_MULTIPLE} on sm90) divide; set kv_block=None "
                        "for training")
        if call.dtype == torch.float64:
            return ("float64: FlexAttention accumulates in float32, below float64 accuracy "
                    "(use backend='blocksparse' or 'dense')")
        if dev == "cpu" and _needs_grad(call, spec):
            return (f"FlexAttention has no backward pass on CPU (torch {torch.__version__}); run under "
                    "torch.no_grad() or use backend='blocksparse'")
        if call.dropout_p > 0:
            return "FlexAttention has no attention dropout (dropout_p > 0); use backend='dense'"
        if call.attn_mask is not None and call.attn_mask.requires_grad:
            return "attn_mask requires grad, which the flex engine does not differentiate (use backend='dense')"
        if spec.block % self._block_pair(call, spec)[1]:
            return f"kv_block={self.kv_block} must divide the query block {spec.block}"
        return self._probe(spec.pattern, call.q_len, call.k_len)

    def auto_skip(self, call: AttentionCall, spec: MaskSpec) -> str | None:
        if call.device.type == "cpu":
            return ("on CPU FlexAttention compiles each pattern family first (~25 s); auto takes "
                    "the next engine here, flex runs only when named (backend='flex')")
        return None

    def _probe(self, pattern: Pattern, q_len: int, k_len: int) -> str | None:
        p = pattern.params(q_len, k_len)
        key = (family_key(pattern), static_key(leaves(p)))
        if key not in self._probes:
            self._probes[key] = probe_rule(pattern, p, q_len, k_len)
        return self._probes[key]

    # -- execution ----------------------------------------------------------------------
    def layout(self, call: AttentionCall, spec: MaskSpec) -> Layout:
        """The token order and pattern this call runs with (cached)."""
        return self._layouts.get(call, spec, self._block_pair(call, spec), self.token_tiling)

    def describe(self, call: AttentionCall, spec: MaskSpec) -> str:
        """How this call runs: token order, block mask, kernel options."""
        bq, bk = pair = self._block_pair(call, spec)
        layout = self._layouts.get(call, spec, pair, self.token_tiling)
        options = dict(self._kernel_options(call, self._blocks_at(call, spec, pair)))
        return (f"FlexAttention over {layout.pattern.describe()}: {layout.note}; block mask {bq}x{bk}; "
                f"kernel options {options or 'FlexAttention defaults'}")

    def run(self, call: AttentionCall, spec: MaskSpec) -> torch.Tensor:
        spec.pattern.check_heads(call.batch, call.heads)
        pair = self._block_pair(call, spec)  # once per call: the layout and the block mask both use it
        layout = self._layouts.get(call, spec, pair, self.token_tiling)
        if not layout.reordered:
            return self._run(call, spec, layout.pattern, pair)
        q, k, v = (layout.into_order(t) for t in (call.query, call.key, call.value))
        out = self._run(replace(call, query=q, key=k, value=v), spec, layout.pattern, pair)
        return layout.out_of_order(out)

    def _run(self, call: AttentionCall, spec: MaskSpec, pattern: Pattern, pair: tuple[int, int]) -> torch.Tensor:
        raw = pattern.params(call.q_len, call.k_len)
        flat = leaves(raw)
        family, values = family_key(pattern), value_key(flat)
        params, params_shapes = self._device_params((family, values), raw, call.device)
        bool_mask = call.attn_mask is not None and call.attn_mask.dtype == torch.bool
        blocks = self._cached_blocks(call, pattern, (family, pattern.describe(), values), bool_mask, raw, pair)
        default_scale = 1.0 / math.sqrt(call.head_dim)
        ratio = None
        if call.scale != default_scale:  # a cached device scalar: no host-to-device copy per call
            ratio_value = call.scale / default_scale
            ratio = self._device_params(("scale", ratio_value), {"r": ratio_value}, call.device,
                                        torch.float32)[0]["r"]
        options = self._kernel_options(call, blocks)
        variant = self._variant(call, spec, family, static_key(flat), blocks, options)
        mods = tuple(spec.mod_tensors)
        shapes = _shapes((call.query, call.key, call.value, call.attn_mask, *mods), params_shapes, blocks)
        try:
            return variant(shapes, call.query, call.key, call.value, blocks.tensors(), pattern, params,
                           pattern.batch is not None, pattern.heads is not None, call.attn_mask, ratio,
                           spec.score_mod, mods, call.group > 1, (blocks.block, blocks.block_k), options)
        except _RanEagerly:
            raise BackendUnavailableError(
                f"the flex kernel for {pattern.describe()} was about to run eagerly (dynamo skipped "
                "compiling it: recompile limit reached, torch.compiler set to eager, or compilation "
                "disabled). attnkit refuses eager FlexAttention, which materializes Lq x Lk scores; use "
                "backend='blocksparse'.") from None
        except BackendUnavailableError:
            raise
        except Exception as err:
            ours = _our_error(err)
            if ours is not None:
                raise ours from err
            if type(err).__name__ == "FailOnRecompileLimitHit":
                raise BackendUnavailableError(
                    f"the flex kernel for {pattern.describe()} hit torch._dynamo's recompile limit "
                    f"({torch._dynamo.config.recompile_limit}) after {variant.compiles} compiles; "
                    "attnkit does not fall back to eager FlexAttention. Use backend='blocksparse'.") from err
            if err.__class__.__module__.startswith(("torch._dynamo", "torch._inductor")):
                first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                raise BackendUnavailableError(
                    f"FlexAttention could not compile {pattern.describe()}: {first}. Use "
                    "backend='blocksparse'.") from err
            raise

    def _device_params(self, key: tuple, raw: dict, device, float_dtype=None) -> tuple[dict, tuple]:
        """``raw`` with numbers as device tensors, and the shapes of its tensors (cached)."""
        key = (key, str(device), float_dtype)
        hit = self._params.get(key)
        if hit is None:
            params = map_leaves(raw, lambda path, x: as_tensor(x, device, float_dtype))
            shapes = tuple(tuple(x.shape) for _, x in leaves(params) if isinstance(x, torch.Tensor))
            hit = self._params[key] = (params, shapes, raw)  # raw keeps tensor ids in the key valid
            if len(self._params) > CACHE_ENTRIES:
                self._params.popitem(last=False)
        else:
            self._params.move_to_end(key)
        return hit[0], hit[1]

    def blocks(self, call: AttentionCall, spec: MaskSpec, demote_full: bool = False) -> FlexBlocks:
        """The block mask this call runs with, over the layout's token order (cached by pattern
        family, parameters, sizes and blocks)."""
        return self._blocks_at(call, spec, self._block_pair(call, spec), demote_full)

    def _blocks_at(self, call: AttentionCall, spec: MaskSpec, pair: tuple[int, int],
                   demote_full: bool = False) -> FlexBlocks:
        pattern = self._layouts.get(call, spec, pair, self.token_tiling).pattern
        raw = pattern.params(call.q_len, call.k_len)
        key = (family_key(pattern), pattern.describe(), value_key(leaves(raw)))
        return self._cached_blocks(call, pattern, key, demote_full, raw, pair)

    def _cached_blocks(self, call: AttentionCall, pattern: Pattern, key: tuple, demote_full: bool,
                       raw: dict, block: tuple[int, int]) -> FlexBlocks:
        key = (key, call.q_len, call.k_len, block, str(call.device), demote_full)
        hit = self._blocks.get(key)
        if hit is None:
            hit = (build_blocks(pattern, call.q_len, call.k_len, block, call.device, demote_full),
                   raw)  # raw keeps the tensor ids in the key valid
            self._blocks[key] = hit
            if len(self._blocks) > CACHE_ENTRIES:
                self._blocks.popitem(last=False)
        else:
            self._blocks.move_to_end(key)
        return hit[0]

    def _variant(self, call: AttentionCall, spec: MaskSpec, family: tuple, static: tuple,
                 blocks: FlexBlocks, options: tuple) -> _Variant:
        mask = call.attn_mask
        fn = spec.score_mod
        ones = tuple(n == 1 for n in (call.batch, call.heads, call.kv_heads, call.q_len, call.k_len,
                                      *blocks.kv_idx.shape))
        key = (family, static, str(call.device), call.dtype, call.head_dim, call.value_dim,
               call.group > 1, _needs_grad(call, spec),
               None if mask is None else (mask.dtype, tuple(s == 1 for s in mask.shape)),
               call.scale != 1.0 / math.sqrt(call.head_dim),
               None if fn is None else (getattr(fn, "__module__", ""), getattr(fn, "__qualname__", repr(fn)),
                                        len(spec.mod_tensors)),
               (blocks.block, blocks.block_k), options, ones, _global_state(call.device))
        variant = self._variants.get(key)
        if variant is None:
            variant = self._variants[key] = _Variant(key, len(self._variants), self.strict)
        return variant

    def stats(self) -> list[dict[str, Any]]:
        """Compiled variants: family, compiles and compile seconds (inductor only)."""
        return [{"family": v.key[0], "dtype": str(v.key[3]), "compiles": v.compiles,
                 "seconds": round(v.seconds, 3)} for v in self._variants.values()]

    def total_compiles(self) -> int:
        return sum(v.compiles for v in self._variants.values())
