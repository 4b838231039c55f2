"""Structured patterns through attnkit's flex engine against dense SDPA and plain FlexAttention.

For each case (sliding window +-256 and +-1024, 2-D and 3-D neighborhood, radial), in ONE run:
forward and forward+backward milliseconds of

- ``ak.attend(..., method=NAME, backend="flex")`` (block mask from the analytic block plan; grid
  patterns run in their tiled token order, the moves of q, k, v and of the output included; the
  kernel alone on already-reordered tokens is ``fwd_kernel_ms``),
- plain FlexAttention: ``torch.compile(flex_attention)`` with ``create_block_mask`` over the same
  rule as ``mask_mod`` (the block mask built by evaluating the rule on the whole L x L grid),
- dense SDPA with the cuDNN kernel and with the flash kernel (no mask; the same for every case),

with the density (fraction of visible pairs, and of computed 128x128 tiles), effective TFLOP/s
(``4 B H L^2 D x tile density`` forward, ``x 3.5`` forward+backward), block-mask build times and
compile times apart from the run times, and two figures of merit ``(speedup over cuDNN) x tile
density`` (FlexAttention's own was 0.54 for a +-256 window at L=32768 on an H200,
/work/shared/perf/anchors.md, with the density of the pattern's tiles in the call's order):
``merit`` takes the tiles attnkit computes (1.0 = time proportional to them; a token order that
computes fewer tiles lowers it as it speeds the call up), ``merit (call order)`` takes the
pattern's tiles in the call's order, as the anchor did (what plain FlexAttention computes; above
1.0 only by computing fewer tiles). Both are equal for patterns run in the call's order.

Timing: ``triton.testing.do_bench`` median (else CUDA events, median), warm-up and the first
(compiling) call excluded, inputs rotated over several copies so no call reuses the previous
one's cache lines.

``--sweep`` then times, for each case and in the same run, the flex engine under a small grid of
settings (FlexAttention ``kernel_options``, ``kv_block``, token tiling off; see ``SWEEP``), forward
and, for a few, forward+backward, each setting its own compiled kernel; results under
``sweep`` in the JSON and a second table in the Markdown. Every setting is checked against the
default setting's output (``max_abs_diff``). ``--budget-s`` bounds the whole run: no new case or
setting starts after it.

GPU (torch 2.11 + Triton 3.6, one H100/H200, under 6 minutes):
    PYTHONPATH=src python scripts/gpu/bench_patterns.py --no-plain-flex --sweep --budget-s 300 --out results/bench_patterns
or without the sweep (~3 minutes, with the plain FlexAttention baseline):
    PYTHONPATH=src python scripts/gpu/bench_patterns.py --out results/bench_patterns
CPU smoke run (tiny sizes, forward only; flex has no backward on CPU):
    PYTHONPATH=src python scripts/gpu/bench_patterns.py --device cpu --tiny --out /tmp/bench_patterns
Options of a case can be replaced without editing this file, e.g.
    --case-options '{"radial": {"frames": 16, "tokens_per_frame": 2048}}'
Writes ``bench_patterns.json`` and ``bench_patterns.md`` under ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

import attnkit as ak
from attnkit.backends.flex_tuning import NARROW_FORWARD
from attnkit.backends.flex_inputs import as_tensor, build_blocks, map_leaves
from attnkit.call import AttentionCall
from attnkit.mechanisms.pattern_method import MASK_ENGINES

FLEX = next(e for e in MASK_ENGINES if e.name == "flex")

BLOCK = 128
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def case_options(L: int, tiny: bool) -> dict[str, tuple[str, dict]]:
    """Case name -> (registered method, options) for sequence length L."""
    w_small, w_large = (16, 64) if tiny else (256, 1024)
    side2 = 32 if tiny else 256
    side3 = 8 if tiny else 64
    per_frame = 64 if tiny else 1024
    return {
        f"window_{w_small}": ("sliding_window", {"left": w_small, "right": w_small}),
        f"window_{w_large}": ("sliding_window", {"left": w_large, "right": w_large}),
        "neighborhood_2d": ("neighborhood", {"grid": (L // side2, side2),
                                             "kernel_size": (7, 7) if tiny else (17, 17)}),
        "neighborhood_3d": ("neighborhood", {"grid": (L // side3 ** 2, side3, side3),
                                             "kernel_size": (3, 5, 5) if tiny else (3, 15, 15)}),
        "radial": ("radial", {"frames": L // per_frame, "tokens_per_frame": per_frame}),
    }


# -- timing ----------------------------------------------------------------------------------
def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def bench_ms(fn, device: str, reps: int) -> float:
    """Median milliseconds of ``fn()`` after warm-up (the caller has already compiled it)."""
    if device == "cuda":
        try:
            from triton.testing import do_bench

            return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))
        except ImportError:
            pass
    for _ in range(3):
        fn()
    sync(device)
    times = []
    for _ in range(reps):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def first_call_s(fn, device: str) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


class Rotation:
    """``sets`` independent (q, k, v) copies, handed out in turn; fixed upstream gradient."""

    def __init__(self, B, H, L, D, dtype, device, sets, grad):
        g = torch.Generator(device=device).manual_seed(0)
        self.sets = [tuple(torch.randn(B, H, L, D, generator=g, device=device, dtype=dtype).requires_grad_(grad)
                           for _ in range(3)) for _ in range(sets)]
        self.dout = torch.randn(B, H, L, D, generator=g, device=device, dtype=dtype)
        self.i = 0

    def next(self):
        self.i = (self.i + 1) % len(self.sets)
        return self.sets[self.i]


def forward(fn, rot: Rotation):
    def run():
        with torch.no_grad():
            return fn(*rot.next())
    return run


def forward_backward(fn, rot: Rotation):
    def run():
        q, k, v = rot.next()
        out = fn(q, k, v)
        return torch.autograd.grad(out, (q, k, v), rot.dout)
    return run


# -- densities ------------------------------------------------------------------------------
def pair_density(pattern, L: int, device: str, rows_per_chunk: int = 1 << 24) -> float:
    """Fraction of visible (query, key) pairs, evaluating the rule in chunks of query rows."""
    p = map_leaves(pattern.params(L, L), lambda path, x: x.to(device) if isinstance(x, torch.Tensor) else x)
    Bp, Hp = pattern.batch or 1, pattern.heads or 1
    rows = max(1, rows_per_chunk // (L * Bp * Hp))
    total = 0
    for start in range(0, L, rows):
        b, h, q, k = pattern.index_grid(L, L, device, start, min(L, start + rows))
        total += int(pattern.rule(b, h, q, k, p).expand(Bp, Hp, q.shape[2], L).sum())
    return total / (L * L * Bp * Hp)


# -- one case ------------------------------------------------------------------------------
def plain_flex(pattern, L: int, device: str):
    """torch.compile(flex_attention) with create_block_mask over the pattern's rule (numbers as
    captured tensors). Returns (fn, block-mask build ms)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    params = map_leaves(pattern.params(L, L), lambda path, x: as_tensor(x, device))

    def mask_mod(b, h, q, k):
        zero = torch.zeros_like(b)
        return pattern.rule(b if pattern.batch else zero, h if pattern.heads else zero, q, k, params)

    B = pattern.batch
    H = pattern.heads
    # compiled mask creation (torch's advice at long L: the eager path materializes L x L
    # intermediates); the first call compiles and is not timed
    fused = device == "cuda"
    create_block_mask(mask_mod, B, H, L, L, device=device, BLOCK_SIZE=BLOCK, _compile=fused)
    times = []
    for _ in range(3):
        sync(device)
        t0 = time.perf_counter()
        mask = create_block_mask(mask_mod, B, H, L, L, device=device, BLOCK_SIZE=BLOCK, _compile=fused)
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    compiled = torch.compile(flex_attention, fullgraph=True)
    return (lambda q, k, v: compiled(q, k, v, block_mask=mask)), statistics.median(times)


def run_case(name, method, options, args, dense, rot_f, rot_b) -> dict:
    device, L = args.device, args.L
    q0 = rot_f.sets[0][0]
    try:
        spec = ak.explain(q0, q0, q0, method=method, backend="flex", **options).plan
    except ak.AttnkitError as err:  # unknown method, bad options, flex cannot run
        return {"case": name, "method": method, "options": options, "skipped": f"{type(err).__name__}: {err}"}
    pattern = spec.pattern
    row: dict = {"case": name, "method": method, "options": options, "pattern": pattern.describe()}
    call = AttentionCall.build(q0, q0, q0)
    layout = FLEX.layout(call, spec)
    row["layout"] = layout.note
    row["tiles"] = "x".join(map(str, layout.pattern.tile)) if layout.reordered else "row-major"
    times = []
    for _ in range(5):
        fresh = copy.copy(layout.pattern)
        if hasattr(fresh, "_plans"):  # a tiled grid caches its plans: time a fresh one
            fresh._plans = {}
        sync(device)
        t0 = time.perf_counter()
        blocks = build_blocks(fresh, L, L, BLOCK, device)
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    row["block_mask_ms"] = statistics.median(times)
    # the forward (no grad) and forward+backward calls may run different plans: forward-only calls of
    # tiled grid layouts take 64-key blocks on CUDA (flex_tuning.default_kv_block)
    forward_blocks = FLEX.blocks(call, spec)
    row["tile_density"], row["kv_block"] = forward_blocks.tile_density, forward_blocks.block_k
    row["tile_density_fwdbwd"] = (FLEX.blocks(AttentionCall.build(*rot_b.sets[0]), spec).tile_density
                                  if rot_b is not None else row["tile_density"])
    row["tile_density_call_order"] = build_blocks(pattern, L, L, BLOCK, device).tile_density
    row["pair_density"] = pair_density(pattern, L, device)

    def ours(q, k, v):
        return ak.attend(q, k, v, method=method, backend="flex", **options)

    all_pairs_flops = 4 * args.B * args.H * L * L * args.D
    row["compile_fwd_s"] = first_call_s(forward(ours, rot_f), device)
    row["fwd_ms"] = bench_ms(forward(ours, rot_f), device, args.reps)
    row["compile_fwd_s"] = max(0.0, row["compile_fwd_s"] - row["fwd_ms"] / 1e3)
    row["fwd_tflops"] = all_pairs_flops * row["tile_density"] / row["fwd_ms"] / 1e9
    if layout.reordered:  # the kernel alone, on tokens already in the tiled order
        def kernel(q, k, v):
            return ak.attend(q, k, v, pattern=layout.pattern, backend="flex")

        first_call_s(forward(kernel, rot_f), device)
        row["fwd_kernel_ms"] = bench_ms(forward(kernel, rot_f), device, args.reps)
    ref = dense.get("fwd_ms")
    if ref:
        row["fwd_speedup"] = ref / row["fwd_ms"]
        row["fwd_merit"] = row["fwd_speedup"] * row["tile_density"]
        row["fwd_merit_pairs"] = row["fwd_speedup"] * row["pair_density"]
        row["fwd_merit_call_order"] = row["fwd_speedup"] * row["tile_density_call_order"]
    if rot_b is not None:
        row["compile_fwdbwd_s"] = first_call_s(forward_backward(ours, rot_b), device)
        row["fwdbwd_ms"] = bench_ms(forward_backward(ours, rot_b), device, args.reps)
        row["compile_fwdbwd_s"] = max(0.0, row["compile_fwdbwd_s"] - row["fwdbwd_ms"] / 1e3)
        row["fwdbwd_tflops"] = 3.5 * all_pairs_flops * row["tile_density_fwdbwd"] / row["fwdbwd_ms"] / 1e9
        ref = dense.get("fwdbwd_ms")
        if ref:
            row["fwdbwd_speedup"] = ref / row["fwdbwd_ms"]
            row["fwdbwd_merit"] = row["fwdbwd_speedup"] * row["tile_density_fwdbwd"]
            row["fwdbwd_merit_call_order"] = row["fwdbwd_speedup"] * row["tile_density_call_order"]
    if not args.no_plain_flex:
        try:
            plain_baseline(row, ours, pattern, args, rot_f, rot_b)
        except Exception as err:  # noqa: BLE001 - record it; the other numbers stand
            row["plain_error"] = f"{type(err).__name__}: {str(err)[:300]}"
    if args.sweep:
        row["sweep"] = sweep_case(name, method, options, args, dense, rot_f, rot_b, row["tile_density_call_order"])
    return row


# -- settings sweep ------------------------------------------------------------------------
# name -> (FlexEngine settings, which case kinds, also forward+backward). Forward+backward only
# where the backward pass can run (kv_block 64 cannot: FlexAttention's sm90 backward tiles).
SWEEP = {
    "untiled": ({"token_tiling": False}, ("grid",), True),
    "kv64": ({"kv_block": 64}, ("grid", "window"), False),
    "bn128_s2": ({"kernel_options": {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 2}},
                 ("window", "grid", "tiles"), False),
    "prescale_safe": ({"kernel_options": {"PRESCALE_QK": True, "ROWS_GUARANTEED_SAFE": True}},
                      ("window", "grid", "tiles"), True),
    "tma": ({"kernel_options": {"USE_TMA": True}}, ("window", "grid", "tiles"), False),
    "bn64_s4": ({"kernel_options": {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 4}},
                ("window", "grid"), False),
    "bm64_w4": ({"kernel_options": {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3}},
                ("window", "grid"), False),
    "bwd_64": ({"kernel_options": {"bwd_BLOCK_M1": 64, "bwd_BLOCK_N1": 64, "bwd_BLOCK_M2": 64, "bwd_BLOCK_N2": 64,
                                   "bwd_num_warps": 4, "bwd_num_stages": 3}}, ("window", "grid"), True),
    # after the 2026-11-27 H200 sweep (bm64_w4 was the only forward gain, on window +-256): the two
    # flags apart (together they gave NaN outputs), and 64-row forward tiles with the backward's defaults
    "prescale": ({"kernel_options": {"PRESCALE_QK": True}}, ("window",), True),
    "rows_safe": ({"kernel_options": {"ROWS_GUARANTEED_SAFE": True}}, ("window",), True),
    **{f"fwd_m64_n{n}_s{s}": ({"kernel_options": {"fwd_BLOCK_M": 64, "fwd_BLOCK_N": n, "fwd_num_warps": 4,
                                                  "fwd_num_stages": s}}, ("window",), True)
       for n, s in ((64, 2), (64, 3), (64, 4), (128, 2))},
    "bwd_m32_n128": ({"kernel_options": {"bwd_BLOCK_M1": 32, "bwd_BLOCK_N1": 128, "bwd_BLOCK_M2": 128,
                                         "bwd_BLOCK_N2": 32, "bwd_num_warps": 4, "bwd_num_stages": 3}}, ("window",), True),
    "bwd_w4_s2": ({"kernel_options": {"bwd_BLOCK_M1": 64, "bwd_BLOCK_N1": 128, "bwd_BLOCK_M2": 128,
                                      "bwd_BLOCK_N2": 64, "bwd_num_warps": 4, "bwd_num_stages": 2}}, ("window",), True),
    # 2026-11-27 (third session): 64-token query and key blocks (forward only), where each query block
    # of a narrow window computes fewer keys (+-256: 576 instead of 640 per 64 queries)
    "block64": ({"call": {"block_size": 64}}, ("window", "grid"), False),
    # tokens given in the engines' tiled order (a layer stack that keeps them there): no moves
    "tiled_input": ({"call": {"token_order": "tiled"}}, ("grid",), True),
    # backward tiles beside the sm90 default (64, 128, 128, 64; 3 stages, 8 warps): the autotuner's other
    # candidates with 8 warps, and 32-row dK/dV tiles with 8 warps; each with the default 64-row forward
    # tiles of narrow plans, so only the backward differs from the default row
    **{f"bwd_m{m}_s{s}_w8": ({"kernel_options": {**NARROW_FORWARD, "bwd_BLOCK_M1": m, "bwd_BLOCK_N1": 128,
                                                 "bwd_BLOCK_M2": 128, "bwd_BLOCK_N2": m, "bwd_num_warps": 8,
                                                 "bwd_num_stages": s}},
                              ("window",), True)
       for m, s in ((64, 1), (64, 4), (64, 5), (32, 3), (32, 4))},
}


def case_kind(method: str) -> str:
    """Which sweep settings apply: ``window`` (1-D windows), ``grid`` (grid patterns: token
    order and key blocks matter), ``tiles`` (patterns defined on whole tiles, e.g. radial)."""
    return {"sliding_window": "window", "neighborhood": "grid", "halo": "grid",
            "divided_space_time": "grid"}.get(method, "tiles")


def sweep_case(name, method, options, args, dense, rot_f, rot_b, call_order_density) -> list[dict]:
    """The flex engine under each SWEEP setting that applies to the case (same inputs, same run).
    A setting's ``call`` entry holds method options for its calls (e.g. ``block_size``); the rest
    are engine settings."""
    kind = case_kind(method)
    chosen = args.sweep_settings or [n for n, (_, kinds, _) in SWEEP.items() if kind in kinds]
    q, k, v = rot_f.sets[0]

    def attend(call_options):
        return lambda q, k, v: ak.attend(q, k, v, method=method, backend="flex", **call_options)

    with torch.no_grad():
        reference = attend(options)(q, k, v).float()
    rows = []
    for setting in chosen:
        engine_settings, _, backward = SWEEP[setting]
        settings = {key: value for key, value in engine_settings.items() if key != "call"}
        call_options = {**options, **engine_settings.get("call", {})}
        ours = attend(call_options)
        if time.perf_counter() - args.t_start > args.budget_s:
            rows.append({"setting": setting, "skipped": "time budget spent"})
            continue
        row: dict = {"setting": setting, "settings": engine_settings}
        try:
            with FLEX.tuned(**settings):
                call = AttentionCall.build(q, k, v)
                spec = ak.explain(q, k, v, method=method, backend="flex", **call_options).plan
                row["tile_density"] = FLEX.blocks(call, spec).tile_density
                row["layout"] = FLEX.layout(call, spec).note
                with torch.no_grad():
                    out = ours(q, k, v).float()
                row["max_abs_diff"] = float((out - reference).abs().max())
                row["nan_outputs"] = int(out.isnan().sum())
                row["fwd_ms"] = bench_ms(forward(ours, rot_f), args.device, args.reps)
                if dense.get("fwd_ms"):
                    row["fwd_merit"] = dense["fwd_ms"] / row["fwd_ms"] * row["tile_density"]
                    row["fwd_merit_call_order"] = dense["fwd_ms"] / row["fwd_ms"] * call_order_density
                if backward and rot_b is not None:
                    first_call_s(forward_backward(ours, rot_b), args.device)
                    row["fwdbwd_ms"] = bench_ms(forward_backward(ours, rot_b), args.device, args.reps)
                    density = FLEX.blocks(AttentionCall.build(*rot_b.sets[0]), spec).tile_density  # its own plan
                    if dense.get("fwdbwd_ms"):
                        row["fwdbwd_merit"] = dense["fwdbwd_ms"] / row["fwdbwd_ms"] * density
        except Exception as err:  # noqa: BLE001 - a setting that cannot compile is a result too
            row["error"] = f"{type(err).__name__}: {str(err).strip().splitlines()[0][:240] if str(err).strip() else ''}"
        if args.device == "cuda":
            torch.cuda.empty_cache()
        print(f"  {name} / {setting}: " + ", ".join(f"{key} {row[key]:.4g}" if isinstance(row[key], float) else
                                                   f"{key} {row[key]}" for key in
                                                   ("fwd_ms", "fwd_merit", "fwdbwd_ms", "error") if key in row),
              flush=True)
        rows.append(row)
    return rows


def plain_baseline(row, ours, pattern, args, rot_f, rot_b) -> None:
    """Plain FlexAttention numbers into ``row``, and its largest difference from ours."""
    device, L = args.device, args.L
    fn, row["plain_block_mask_ms"] = plain_flex(pattern, L, device)
    row["plain_compile_fwd_s"] = first_call_s(forward(fn, rot_f), device)
    row["plain_fwd_ms"] = bench_ms(forward(fn, rot_f), device, args.reps)
    row["plain_compile_fwd_s"] = max(0.0, row["plain_compile_fwd_s"] - row["plain_fwd_ms"] / 1e3)
    with torch.no_grad():
        a, b = ours(*rot_f.sets[0]), fn(*rot_f.sets[0])
    row["max_abs_diff_vs_plain"] = float((a.float() - b.float()).abs().max())
    if rot_b is not None:
        row["plain_compile_fwdbwd_s"] = first_call_s(forward_backward(fn, rot_b), device)
        row["plain_fwdbwd_ms"] = bench_ms(forward_backward(fn, rot_b), device, args.reps)
        row["plain_compile_fwdbwd_s"] = max(0.0, row["plain_compile_fwdbwd_s"] - row["plain_fwdbwd_ms"] / 1e3)


def dense_baselines(args, rot_f, rot_b) -> dict:
    """cuDNN and flash SDPA (CUDA), or torch's default SDPA (CPU); the first one that runs is the
    reference of the speedups."""
    device = args.device
    kernels = ["sdpa_cudnn", "sdpa_flash"] if device == "cuda" else ["sdpa"]
    out: dict = {"kernels": {}}
    for name in kernels:
        fn = lambda q, k, v, name=name: ak.attend(q, k, v, backend=name)  # noqa: E731
        row = {}
        try:
            row["fwd_ms"] = bench_ms(forward(fn, rot_f), device, args.reps)
            if rot_b is not None:
                row["fwdbwd_ms"] = bench_ms(forward_backward(fn, rot_b), device, args.reps)
        except ak.AttnkitError as err:
            row["skipped"] = str(err)
        flops = 4 * args.B * args.H * args.L ** 2 * args.D
        if "fwd_ms" in row:
            row["fwd_tflops"] = flops / row["fwd_ms"] / 1e9
        if "fwdbwd_ms" in row:
            row["fwdbwd_tflops"] = 3.5 * flops / row["fwdbwd_ms"] / 1e9
        out["kernels"][name] = row
        if "reference" not in out and "fwd_ms" in row:
            out.update(reference=name, fwd_ms=row["fwd_ms"], fwdbwd_ms=row.get("fwdbwd_ms"))
    return out


# -- report --------------------------------------------------------------------------------
def fmt(x, digits=3):
    if x is None:
        return "—"
    if isinstance(x, float):
        return f"{x:.{digits}g}" if abs(x) < 1000 else f"{x:.0f}"
    return str(x)


def markdown(result: dict) -> str:
    env, cfg, dense = result["environment"], result["config"], result["dense"]
    lines = [f"# Structured patterns: flex engine vs dense SDPA vs plain FlexAttention",
             "", f"{env['device_name']}; torch {env['torch']}, triton {env['triton']}; "
             f"B={cfg['B']} H={cfg['H']} L={cfg['L']} D={cfg['D']} {cfg['dtype']}; block {BLOCK}; "
             f"timer {env['timer']} (median). Speedups and merit against `{dense.get('reference')}`.", "",
             "| dense kernel | fwd ms | fwd+bwd ms | fwd TFLOP/s | fwd+bwd TFLOP/s |", "|---|---|---|---|---|"]
    for name, row in dense["kernels"].items():
        if "skipped" in row:
            lines.append(f"| {name} | skipped: {row['skipped'][:80]} | | | |")
        else:
            lines.append(f"| {name} | {fmt(row.get('fwd_ms'))} | {fmt(row.get('fwdbwd_ms'))} | "
                         f"{fmt(row.get('fwd_tflops'))} | {fmt(row.get('fwdbwd_tflops'))} |")
    lines += ["", "| case | order | pairs | tiles | tiles in call order | fwd ms | fwd kernel ms | fwd TFLOP/s | "
              "fwd speedup | fwd merit | fwd merit (call order) | fwd+bwd ms | fwd+bwd TFLOP/s | fwd+bwd speedup | "
              "fwd+bwd merit | fwd+bwd merit (call order) | plain flex fwd / fwd+bwd ms | "
              "block mask ms (ours / plain) | compile s (fwd / fwd+bwd) | max abs diff vs plain |",
              "|" + "---|" * 20]
    for row in result["cases"]:
        if "skipped" in row:
            lines.append(f"| {row['case']} | skipped: {row['skipped'][:120]} |" + " |" * 18)
            continue
        lines.append(
            f"| {row['case']} | {row.get('tiles', '')} | {fmt(row['pair_density'])} | {fmt(row['tile_density'])} | "
            f"{fmt(row.get('tile_density_call_order'))} | {fmt(row['fwd_ms'])} | {fmt(row.get('fwd_kernel_ms'))} | "
            f"{fmt(row['fwd_tflops'])} | {fmt(row.get('fwd_speedup'))} | {fmt(row.get('fwd_merit'), 2)} | "
            f"{fmt(row.get('fwd_merit_call_order'), 2)} | "
            f"{fmt(row.get('fwdbwd_ms'))} | {fmt(row.get('fwdbwd_tflops'))} | {fmt(row.get('fwdbwd_speedup'))} | "
            f"{fmt(row.get('fwdbwd_merit'), 2)} | {fmt(row.get('fwdbwd_merit_call_order'), 2)} | "
            f"{fmt(row.get('plain_fwd_ms'))} / {fmt(row.get('plain_fwdbwd_ms'))} | "
            f"{fmt(row['block_mask_ms'])} / {fmt(row.get('plain_block_mask_ms'))} | "
            f"{fmt(row['compile_fwd_s'], 2)} / {fmt(row.get('compile_fwdbwd_s'), 2)} | "
            f"{fmt(row.get('max_abs_diff_vs_plain'), 2)} |")
    sweeps = [(row["case"], s) for row in result["cases"] for s in row.get("sweep", [])]
    if sweeps:
        lines += ["", "Sweep (flex engine settings; merit against the same dense reference; default = the table "
                  "above):", "", "| case | setting | tiles | fwd ms | fwd merit | fwd merit (call order) | fwd+bwd ms | "
                  "fwd+bwd merit | max abs diff vs default | note |", "|" + "---|" * 10]
        for case, s in sweeps:
            note = s.get("error") or s.get("skipped") or (f"{s['nan_outputs']} NaN outputs" if s.get("nan_outputs")
                                                         else "")
            lines.append(f"| {case} | {s['setting']} | {fmt(s.get('tile_density'))} | {fmt(s.get('fwd_ms'))} | "
                         f"{fmt(s.get('fwd_merit'), 2)} | {fmt(s.get('fwd_merit_call_order'), 2)} | "
                         f"{fmt(s.get('fwdbwd_ms'))} | {fmt(s.get('fwdbwd_merit'), 2)} | "
                         f"{fmt(s.get('max_abs_diff'), 2)} | {note[:120]} |")
    for row in result["cases"]:
        if row.get("layout"):
            kv = row.get("kv_block")
            lines.append(f"\n- {row['case']}: {row['layout']}" + (f"; forward key block {kv}" if kv else ""))
    for note in result["notes"]:
        lines.append(f"\n- {note}")
    for row in result["cases"]:
        if "plain_error" in row:
            lines.append(f"\n- {row['case']}: plain FlexAttention failed: {row['plain_error']}")
    return "\n".join(lines) + "\n"


def environment(device: str) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    name = torch.cuda.get_device_name() if device == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    try:
        from triton.testing import do_bench  # noqa: F401

        timer = "triton.testing.do_bench" if device == "cuda" else "perf_counter"
    except ImportError:
        timer = "CUDA events" if device == "cuda" else "perf_counter"
    return {"device_name": name, "torch": torch.__version__, "triton": triton_version,
            "cuda": torch.version.cuda, "python": sys.version.split()[0], "timer": timer}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--tiny", action="store_true", help="L=512, H=2, D=16 (CPU smoke run)")
    ap.add_argument("--L", type=int, default=None, help="sequence length (default 32768; tiny 512)")
    ap.add_argument("--B", type=int, default=1)
    ap.add_argument("--H", type=int, default=None, help="heads (default 16; tiny 2)")
    ap.add_argument("--D", type=int, default=None, help="head dim (default 128; tiny 16)")
    ap.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default bf16 (cuda), fp32 (cpu)")
    ap.add_argument("--cases", nargs="*", default=None, help="case names (default: all)")
    ap.add_argument("--case-options", default=None, help="JSON: case name -> options replacing the defaults")
    ap.add_argument("--no-backward", action="store_true", help="forward only")
    ap.add_argument("--no-plain-flex", action="store_true", help="skip the plain FlexAttention baseline")
    ap.add_argument("--sets", type=int, default=3, help="rotated input copies")
    ap.add_argument("--reps", type=int, default=20, help="timed calls when do_bench is not used")
    ap.add_argument("--budget-s", type=float, default=270.0,
                    help="start no new case or sweep setting after this many seconds (the run stays under ~6 min "
                         "on one H100)")
    ap.add_argument("--sweep", action="store_true", help="also time the flex engine under the SWEEP settings")
    ap.add_argument("--sweep-settings", nargs="*", default=None,
                    help=f"sweep only these settings (default: those that apply to each case); one of {sorted(SWEEP)}")
    ap.add_argument("--out", required=True, help="output directory")
    args = ap.parse_args(argv)
    args.L = args.L or (512 if args.tiny else 32768)
    args.H = args.H or (2 if args.tiny else 16)
    args.D = args.D or (16 if args.tiny else 128)
    args.dtype = args.dtype or ("bf16" if args.device == "cuda" else "fp32")
    unknown = [n for n in args.sweep_settings or [] if n not in SWEEP]
    if unknown:
        raise SystemExit(f"--sweep-settings: unknown {unknown}; settings are {sorted(SWEEP)}")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but no CUDA device; use --device cpu --tiny for a smoke run")
    cases = case_options(args.L, args.tiny)
    overrides = json.loads(args.case_options) if args.case_options else {}
    for name, opts in overrides.items():
        if name not in cases:
            raise SystemExit(f"--case-options: unknown case {name!r}; cases are {sorted(cases)}")
        cases[name] = (cases[name][0], opts)
    chosen = args.cases if args.cases is not None else list(cases)
    unknown = [c for c in chosen if c not in cases]
    if unknown:
        raise SystemExit(f"unknown cases {unknown}; cases are {sorted(cases)}")
    env = environment(args.device)
    print(f"device: {env['device_name']} | torch {env['torch']} | triton {env['triton']} | "
          f"cuda {env['cuda']} | timer {env['timer']}", flush=True)
    # plain flex_attention compiles once per case and per grad mode: a raised limit, and a hard
    # error instead of dynamo's silent eager fallback (anchors.md, pitfall 2)
    config = torch._dynamo.config
    patch = {"recompile_limit": max(getattr(config, "recompile_limit", 8), 64), "fail_on_recompile_limit_hit": True}
    with config.patch({k: v for k, v in patch.items() if hasattr(config, k)}):
        result = run_all(args, env, cases, chosen)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_patterns.json").write_text(json.dumps(result, indent=2, default=str))
    (out / "bench_patterns.md").write_text(markdown(result))
    print(markdown(result))
    print(f"wrote {out / 'bench_patterns.json'} and {out / 'bench_patterns.md'} "
          f"in {result['total_seconds']:.0f} s", flush=True)
    return result


def run_all(args, env: dict, cases: dict, chosen: list[str]) -> dict:
    t_start = args.t_start = time.perf_counter()
    dtype = DTYPES[args.dtype]
    backward = not args.no_backward and args.device == "cuda"
    notes = []
    if not backward and not args.no_backward:
        notes.append("forward+backward skipped: FlexAttention has no backward pass on CPU")
    rot_f = Rotation(args.B, args.H, args.L, args.D, dtype, args.device, args.sets, grad=False)
    rot_b = Rotation(args.B, args.H, args.L, args.D, dtype, args.device, args.sets, grad=True) if backward else None
    dense = dense_baselines(args, rot_f, rot_b)
    print("dense:", json.dumps(dense["kernels"]), flush=True)
    rows = []
    for name in chosen:
        method, opts = cases[name]
        t0 = time.perf_counter()
        if t0 - t_start > args.budget_s:
            rows.append({"case": name, "method": method, "options": opts,
                         "skipped": f"time budget ({args.budget_s:.0f} s) spent; run it with --cases {name}"})
            print(f"{name}: skipped — time budget spent", flush=True)
            continue
        try:
            row = run_case(name, method, opts, args, dense, rot_f, rot_b)
        except Exception as err:  # noqa: BLE001 - one failing case must not lose the run
            row = {"case": name, "method": method, "options": opts,
                   "skipped": f"failed: {type(err).__name__}: {str(err)[:300]}"}
        if args.device == "cuda":
            torch.cuda.empty_cache()
        row["case_seconds"] = time.perf_counter() - t0
        rows.append(row)
        if "skipped" in row:
            print(f"{name}: skipped — {row['skipped']}", flush=True)
        else:
            print(f"{name}: tiles {row['tile_density']:.4f} fwd {row['fwd_ms']:.3f} ms "
                  f"merit {row.get('fwd_merit', float('nan')):.2f} "
                  f"fwd+bwd {row.get('fwdbwd_ms', float('nan')):.3f} ms ({row['case_seconds']:.0f} s)", flush=True)
    return {"environment": env, "config": {k: getattr(args, k) for k in ("B", "H", "L", "D", "dtype", "device")},
            "dense": dense, "cases": rows, "notes": notes, "total_seconds": time.perf_counter() - t_start}


if __name__ == "__main__":
    main()
