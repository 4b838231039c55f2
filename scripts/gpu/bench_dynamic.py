"""Benchmark the training-free dynamic-sparsity methods: selection time and attention time apart.

    python scripts/gpu/bench_dynamic.py --out results/dynamic            # H100/H200: L=32768, B1 H16 D128, bf16
    python scripts/gpu/bench_dynamic.py --out /tmp/d --device cpu --length 256 --heads 2 --dim 16 --reps 1

For each method (moba, vmoba, kinetics, hip, h2o, seer, dma; hcam, landmark) at each density
(default 5 %, 10 %, 25 %): ``ak.select`` (the selection step alone) and ``Selection.attend``
(exact attention on that selection) are timed separately (median of ``--reps`` after one warm-up;
one timed run when a selection takes over 2 s), beside cuDNN dense SDPA (causal and non-causal)
in the same process. seer runs its training-free pooled gate and dma its fixed stand-in bias
(their learned parts need a trained model). hcam and landmark are two-level methods without an
``ak.select``: their selection step is the method's ``prepare`` (top-k chunks / blocks and
their outer logits, a ``GroupPlan``) and their attention the ``gather`` form on that plan (the
JSON also records the ``dense`` form on the same plan as ``dense_form_ms``); their density counts
the keys a query reads and their tile density is not defined (``-``).
The attention runs on ``backend="flex"`` when the methods offer it on this device, else on
``blocksparse``; every row records its backend. Methods with per-query selections (moba, vmoba,
kinetics) are also timed on the ``varlen`` engine (``varlen_ms``) on a CPU, and on a GPU with
``--varlen`` (an H200 took 12.5 s per moba call at L = 32768 there, against flex's 0.16 s). Rows also give the kept
density (over the pairs dense attention uses), the fraction of 128x128 tiles an engine visits,
and the softmax-mass recall of the selection (dense attention's probability mass on the kept
keys, averaged over ``--recall-rows`` evenly spaced queries). Writes ``bench_dynamic.json`` and
``bench_dynamic.md`` to ``--out`` and prints the card, versions and the table.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

import attnkit as ak

METHODS = ("moba", "vmoba", "kinetics", "hip", "h2o", "seer", "dma", "hcam", "landmark")
TWO_LEVEL = ("hcam", "landmark")  # no ak.select: prepare (selection) + the gather form (attention)


def method_options(name: str, length: int) -> dict:
    """The paper's knobs at this length (density is added per row)."""
    chunk = max(16, min(512, length // 64))
    if name == "moba":
        return {"chunk_size": chunk}
    if name == "vmoba":
        return {"grid": auto_grid(length), "partition": "3d"}
    if name == "kinetics":
        return {"chunk_size": 16, "sink": 4, "local": 16}
    if name == "hip":  # the paper's prefill setting (query blocks of 32 share one selection)
        return {"query_chunk": 32, "key_chunk": 2, "window": min(128, max(1, length // 8))}
    if name == "seer":  # the official gate block (16 for short test runs)
        return {"gate_block": 64 if length >= 1024 else 16}
    if name == "hcam":
        return {"chunk_size": 64 if length >= 1024 else 16}
    if name == "landmark":  # the LLaMA setting: 63 tokens + a landmark per block
        return {"block": 64 if length >= 1024 else 16}
    return {}


def auto_grid(length: int) -> tuple[int, int, int]:
    """(frames, height, width) with up to 8 frames and a near-square frame."""
    frames = max(d for d in (1, 2, 4, 8) if length % d == 0)
    rest = length // frames
    height = max(d for d in range(1, int(math.isqrt(rest)) + 1) if rest % d == 0)
    return frames, height, rest // height


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, reps: int, device: torch.device) -> tuple[float, object]:
    """Median milliseconds of ``fn`` over ``reps`` runs after one warm-up (one run when slow)."""
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    first = time.perf_counter() - t0
    if first > 2.0:
        reps = 1
    times = []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3, out


def environment(device: torch.device) -> dict:
    env = {"torch": torch.__version__, "python": platform.python_version(), "attnkit": ak.__version__,
           "device": str(device), "card": platform.processor() or platform.machine()}
    if device.type == "cuda":
        env["card"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
        env["cudnn"] = torch.backends.cudnn.version()
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    return env


def attention_backend(device: torch.device) -> str:
    backends = ak.method_info("moba").backends
    return "flex" if device.type == "cuda" and "flex" in backends else "blocksparse"


def dense_rows(q, k, v, reps, device) -> list[dict]:
    rows = []
    backend = "sdpa_cudnn" if device.type == "cuda" else "sdpa"  # cuDNN: the fastest dense kernel (anchors.md)
    for causal in (True, False):
        row = {"method": "dense", "causal": causal, "backend": backend}
        try:
            row["attention_ms"], _ = timed(lambda: ak.attend(q, k, v, is_causal=causal, method="dense",
                                                             backend=backend), reps, device)
        except Exception as err:  # recorded, never hidden
            row["error"] = f"{type(err).__name__}: {err}"
        rows.append(row)
    return rows


def two_level_row(row, name, opts, q, k, v, args, device) -> dict:
    """hcam / landmark: ``prepare`` (the selection) and the gather form (the attention) timed apart."""
    from attnkit.api import _dispatch
    from attnkit.mechanisms.sparse._two_level import run_plan_dense

    impl, call, engine, _ = _dispatch(q, k, v, None, 0.0, True, None, False, name, "auto", None, opts)
    row["backend"] = engine.name
    row["selection_ms"], plan = timed(lambda: impl.prepare(call), args.reps, device)
    row["attention_ms"], _ = timed(lambda: engine.run(call, plan), args.reps, device)
    row["total_ms"] = row["selection_ms"] + row["attention_ms"]
    try:  # the same plan through the dense-score form, for comparison (JSON only)
        row["dense_form_ms"], _ = timed(lambda: run_plan_dense(call, plan), args.reps, device)
    except Exception as err:  # e.g. out of memory at long lengths: recorded
        row["dense_form_error"] = f"{type(err).__name__}: {err}"
    rows = torch.linspace(0, q.shape[2] - 1, min(args.recall_rows, q.shape[2]), device=device).long()
    row["density"], row["recall"] = plan_density_recall(plan, q, k, call.scale, rows)
    row["tile_density"] = None
    return row


def plan_density_recall(plan, q, k, scale, rows) -> tuple[float, float]:
    """Kept share of the causal pairs (keys a query reads, over all rows) and the softmax-mass recall
    of those keys over ``rows`` (causal self-attention)."""
    from attnkit.mechanisms.sparse._two_level import key_allowed

    L = q.shape[2]
    group = q.shape[1] // k.shape[1]
    kept = 0.0
    offs = torch.arange(plan.size, device=q.device)
    step = max(1, (1 << 24) // max(1, plan.groups[:, :, :1].numel() * plan.size))
    for r0 in range(0, L, step):
        g = plan.groups[:, :, r0:r0 + step]
        pos = g[..., None] * plan.size + offs
        a = torch.arange(r0, r0 + g.shape[2], device=q.device).view(1, 1, -1, 1, 1)
        ok = key_allowed(pos, a, plan.size, L, plan.causal, plan.skip_last) & (g[..., None] >= 0)
        kept += float(ok.sum())
    density = kept / (q.shape[0] * q.shape[1] * L * (L + 1) / 2)
    g = plan.groups[:, :, rows]
    pos = g[..., None] * plan.size + offs
    ok = key_allowed(pos, rows.view(1, 1, -1, 1, 1), plan.size, L, plan.causal, plan.skip_last) & (g[..., None] >= 0)
    hits = torch.zeros(*g.shape[:3], L, dtype=torch.int32, device=q.device)
    mask = hits.scatter_add_(-1, pos.clamp(0, L - 1).flatten(3), ok.flatten(3).to(torch.int32)) > 0
    kk = k.float().repeat_interleave(group, 1)
    s = (q[:, :, rows].float() @ kk.transpose(-1, -2)) * scale
    s = s.masked_fill(torch.arange(L, device=q.device) > rows[:, None], float("-inf"))
    p = torch.softmax(s, -1)
    return density, float((p * mask).sum(-1).mean())


def method_row(name, density, q, k, v, args, device, backend) -> dict:
    causal = name != "vmoba"
    opts = {**method_options(name, q.shape[2]), "density": density}
    row = {"method": name, "target_density": density, "causal": causal, "options": _jsonable(opts),
           "backend": backend}
    if name in TWO_LEVEL:
        try:
            return two_level_row(row, name, opts, q, k, v, args, device)
        except Exception as err:  # recorded, never hidden
            row["error"] = f"{type(err).__name__}: {err}"
            return row
    try:
        row["selection_ms"], sel = timed(lambda: ak.select(q, k, v, is_causal=causal, method=name, **opts),
                                         args.reps, device)
        try:
            row["attention_ms"], _ = timed(lambda: sel.attend(q, k, v, backend=backend), args.reps, device)
        except Exception as err:  # flex failed: say so, and measure the blocksparse engine instead
            if backend == "blocksparse":
                raise
            row[f"{backend}_error"] = f"{type(err).__name__}: {err}"
            row["backend"] = "blocksparse"
            row["attention_ms"], _ = timed(lambda: sel.attend(q, k, v, backend="blocksparse"), args.reps, device)
        row["total_ms"] = row["selection_ms"] + row["attention_ms"]
        if args.varlen and "varlen" in ak.method_info(name).backends:  # per-query selections: varlen too
            try:
                row["varlen_ms"], _ = timed(lambda: sel.attend(q, k, v, backend="varlen"), args.reps, device)
            except Exception as err:  # recorded, never hidden
                row["varlen_error"] = f"{type(err).__name__}: {err}"
        row["density"] = sel.density()
        row["tile_density"] = sel.tile_density(128)
        rows = torch.linspace(0, q.shape[2] - 1, min(args.recall_rows, q.shape[2]), device=device).long()
        row["recall"] = float(sel.recall(q, k, rows=rows).mean())
        del sel
    except Exception as err:
        row["error"] = f"{type(err).__name__}: {err}"
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def _jsonable(opts: dict) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in opts.items()}


def markdown(env: dict, config: dict, rows: list[dict]) -> str:
    dense = {r["causal"]: r.get("attention_ms") for r in rows if r["method"] == "dense"}
    lines = [f"# Dynamic sparsity: selection and attention ({env['card']})", "",
             f"torch {env['torch']}, triton {env['triton']}, attnkit {env['attnkit']}; "
             f"B={config['batch']} H={config['heads']} L={config['length']} D={config['dim']} {config['dtype']}; "
             f"median of {config['reps']} runs. Dense ({config['dense_backend']}): causal {_ms(dense.get(True))} ms, "
             f"non-causal {_ms(dense.get(False))} ms.", "",
             "| method | target | kept density | tile density | recall | selection ms | attention ms | backend | "
             "total ms | dense ms | attention speedup | total speedup | varlen ms |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["method"] == "dense":
            continue
        if "error" in r:
            lines.append(f"| {r['method']} | {r['target_density']:.0%} | error: {r['error'][:80]} |" + " |" * 10)
            continue
        base = dense.get(r["causal"])
        lines.append(
            f"| {r['method']} | {r['target_density']:.0%} | {r['density']:.3f} | {_num(r['tile_density'])} | "
            f"{r['recall']:.3f} | {_ms(r['selection_ms'])} | {_ms(r['attention_ms'])} | {r['backend']} | "
            f"{_ms(r['total_ms'])} | {_ms(base)} | {_ratio(base, r['attention_ms'])} | {_ratio(base, r['total_ms'])} | "
            f"{_ms(r.get('varlen_ms'))} |")
    lines += ["", "Kept density: kept (query, key) pairs over those dense attention uses. Tile density: fraction of "
              "128x128 tiles the engine visits. Recall: dense attention's softmax mass on the kept keys. "
              "Varlen ms: the same selection's attention on the varlen engine (per-query selections only)."]
    return "\n".join(lines) + "\n"


def _num(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def _ms(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def _ratio(base, x) -> str:
    return "-" if not base or not x else f"{base / x:.2f}x"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--length", type=int, default=32768)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    ap.add_argument("--densities", default="0.05,0.1,0.25")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--recall-rows", type=int, default=1024)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--budget-s", type=float, default=210.0, help="skip the remaining rows after this long")
    ap.add_argument("--varlen", action=argparse.BooleanOptionalAction, default=None,
                    help="time the varlen engine too (default: on CPU only)")
    args = ap.parse_args(argv)
    if args.varlen is None:
        args.varlen = args.device == "cpu"
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    g = torch.Generator(device=device).manual_seed(0)
    shape = (args.batch, args.heads, args.length, args.dim)
    q, k, v = (torch.randn(shape, generator=g, device=device, dtype=dtype) for _ in range(3))
    env = environment(device)
    config = {k: getattr(args, k) for k in ("length", "batch", "heads", "dim", "dtype", "reps")}
    config["dense_backend"] = "sdpa_cudnn" if device.type == "cuda" else "sdpa"
    print(f"card: {env['card']}; torch {env['torch']}, triton {env['triton']}, cuda {env.get('cuda')}, "
          f"cudnn {env.get('cudnn')}", flush=True)
    backend = attention_backend(device)
    start = time.perf_counter()
    rows = dense_rows(q, k, v, args.reps, device)
    for name in args.methods.split(","):
        for density in (float(d) for d in args.densities.split(",")):
            if time.perf_counter() - start > args.budget_s:
                rows.append({"method": name, "target_density": density, "causal": name != "vmoba",
                             "backend": backend, "error": f"skipped: over the {args.budget_s:.0f} s budget"})
                continue
            row = method_row(name, density, q, k, v, args, device, backend)
            rows.append(row)
            print(json.dumps(row), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"environment": env, "config": config, "rows": rows, "seconds": time.perf_counter() - start}
    (out / "bench_dynamic.json").write_text(json.dumps(result, indent=2))
    text = markdown(env, config, rows)
    (out / "bench_dynamic.md").write_text(text)
    print(text)
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
