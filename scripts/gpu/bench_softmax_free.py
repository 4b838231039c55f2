"""Speed of attnkit's sigmoid / softplus Triton kernels against SDPA's cuDNN and flash kernels.

    python scripts/gpu/bench_softmax_free.py --out bench-results/softmax_free      # GPU, < 4 min on H100
    python scripts/gpu/bench_softmax_free.py --tiny --out /tmp/sf                  # CPU smoke run

GPU run: B=1, H=16, D in {128, 64}, bf16, L in {4k, 8k, 16k, 32k}, causal and noncausal; forward and
forward+backward; medians of ``triton.testing.do_bench`` (all in the same run). Before timing, the
kernels are checked against the float64 dense definition at L=1024 (outputs and gradients); a
failed check is reported and makes the exit code 1. Kernels are called directly (attnkit's Python
dispatch is outside the timed region; SDPA is called inside ``sdpa_kernel``). FLOPs are counted as
4·B·H·Lq·Lk·D (halved for causal), x3.5 for forward+backward, as in shared/perf/anchors.md.
Writes ``bench_softmax_free.json`` and ``bench_softmax_free.md`` to ``--out``; prints the card and
versions. ``--tiny`` (or no CUDA) runs tiny sizes on the CPU with the blocksparse engine in place
of the Triton kernels and SDPA's default kernel as the baseline (tests that path).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import attnkit as ak
from attnkit.api import _dispatch

VARIANTS = {  # label -> (method, options)
    "sigmoid": ("sigmoid", {}),
    "softplus": ("softplus", {}),
    "softplus_reweight": ("softplus", {"reweight_power": 2.0}),
}


def versions() -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if torch.cuda.is_available() else None,
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu"}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    return info


def timer(gpu: bool):
    if gpu:
        from triton.testing import do_bench

        return lambda fn, grads: do_bench(fn, warmup=25, rep=100, grad_to_none=grads, return_mode="median")

    def cpu_time(fn, grads, reps=1):  # the CPU path only shows that the script runs
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
        return sorted(times)[len(times) // 2]

    return cpu_time


def ours(method, opts, q, k, v, causal, backend):
    """The engine's run function on a prepared call (dispatch done once, outside the timing)."""
    impl, call, engine, why = _dispatch(q, k, v, None, 0.0, causal, None, False, method, backend, None, opts)
    return lambda: engine.run(call, why.plan)


def sdpa(kernel, q, k, v, causal):
    if kernel is None:
        return lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def run():
        with sdpa_kernel(getattr(SDPBackend, kernel)):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    return run


def rel_err(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def check(device, dtype, L, D, backend) -> list[dict]:
    """Ours vs the float64 dense definition at length L: outputs and gradients."""
    rows = []
    g = torch.Generator(device="cpu").manual_seed(0)
    base = [torch.randn(1, 16 if device == "cuda" else 2, L, D, generator=g) for _ in range(4)]
    for label, (method, opts) in VARIANTS.items():
        for causal in (False, True):
            q, k, v = (t.to(device, dtype).requires_grad_() for t in base[:3])
            w = base[3].to(device, dtype)
            out = ours(method, opts, q, k, v, causal, backend)()
            grads = torch.autograd.grad((out * w).sum(), (q, k, v))
            q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
            ref = ak.attend(q64, k64, v64, is_causal=causal, method=method, backend="dense", **opts)
            want = torch.autograd.grad((ref * w.double()).sum(), (q64, k64, v64))
            errs = [rel_err(out, ref)] + [rel_err(a, b) for a, b in zip(grads, want)]
            tol = 2e-2 if dtype in (torch.bfloat16, torch.float16) else 1e-4
            rows.append({"variant": label, "causal": causal, "L": L, "D": D, "backend": backend,
                         "errors (out, dq, dk, dv)": errs, "tolerance": tol, "ok": max(errs) <= tol})
            print(f"check {label:18s} causal={causal!s:5s} D={D} L={L}: "
                  + " ".join(f"{e:.1e}" for e in errs) + ("  ok" if rows[-1]["ok"] else "  FAIL"), flush=True)
    return rows


def flops(L, D, causal, H, passes):
    f = 4 * H * L * L * D * (0.5 if causal else 1.0)
    return f * (3.5 if passes == "fwd+bwd" else 1.0)


def bench(device, dtype, lengths, dims, H, ours_backend, baselines, budget_s) -> list[dict]:
    measure = timer(device == "cuda")
    rows, start = [], time.time()
    for D in dims:
        for L in lengths:
            for causal in (False, True):
                g = torch.Generator(device="cpu").manual_seed(L + D)
                q, k, v, do = (torch.randn(1, H, L, D, generator=g).to(device, dtype) for _ in range(4))
                q, k, v = (t.requires_grad_() for t in (q, k, v))
                fns = {f"{label} ({ours_backend})": ours(m, o, q, k, v, causal, ours_backend)
                       for label, (m, o) in VARIANTS.items()}
                fns.update({f"sdpa {name}": sdpa(kernel, q, k, v, causal) for name, kernel in baselines})
                timed = {}
                for name, fn in fns.items():
                    for passes in ("fwd", "fwd+bwd"):
                        if time.time() - start > budget_s:
                            rows.append({"name": name, "L": L, "D": D, "causal": causal, "passes": passes,
                                         "ms": None, "note": "skipped: time budget"})
                            continue
                        run = fn if passes == "fwd" else (lambda fn=fn: fn().backward(do))
                        with torch.no_grad() if passes == "fwd" else torch.enable_grad():
                            ms = measure(run, [q, k, v])
                        timed[(name, passes)] = ms
                        rows.append({"name": name, "L": L, "D": D, "causal": causal, "passes": passes, "ms": ms,
                                     "tflops": flops(L, D, causal, H, passes) / ms / 1e9})
                for row in rows[-len(fns) * 2:]:
                    for base_name, _ in baselines:
                        base = timed.get((f"sdpa {base_name}", row["passes"]))
                        if row.get("ms") and base:
                            row[f"speedup vs {base_name}"] = base / row["ms"]
                print(f"D={D} L={L} causal={causal}: " + ", ".join(
                    f"{n} {p} {ms:.3f} ms" for (n, p), ms in timed.items()), flush=True)
                del q, k, v, do, fns
                if device == "cuda":
                    torch.cuda.empty_cache()
    return rows


def markdown(meta, checks, rows, baselines) -> str:
    lines = [f"# Softmax-free attention kernels — {meta['device']}", "",
             "Versions: " + ", ".join(f"{k} {v}" for k, v in meta.items() if k != "device"), "",
             "## Correctness (relative max error vs float64 dense definition)", "",
             "| variant | causal | D | L | out | dq | dk | dv | ok |", "|---|---|---|---|---|---|---|---|---|"]
    for c in checks:
        e = c["errors (out, dq, dk, dv)"]
        lines.append(f"| {c['variant']} | {c['causal']} | {c['D']} | {c['L']} | "
                     + " | ".join(f"{x:.1e}" for x in e) + f" | {'ok' if c['ok'] else 'FAIL'} |")
    cols = [f"speedup vs {b}" for b, _ in baselines]
    lines += ["", f"## Timings (B=1, H={meta['heads']}, {meta['dtype']}, median ms)", "",
              "| name | D | L | causal | passes | ms | TFLOP/s | " + " | ".join(cols) + " |",
              "|---|---|---|---|---|---|---|" + "---|" * len(cols)]
    for r in rows:
        if r.get("ms") is None:
            lines.append(f"| {r['name']} | {r['D']} | {r['L']} | {r['causal']} | {r['passes']} | {r['note']} | | "
                         + " | " * len(cols))
            continue
        lines.append(f"| {r['name']} | {r['D']} | {r['L']} | {r['causal']} | {r['passes']} | {r['ms']:.3f} | "
                     f"{r['tflops']:.3g} | " + " | ".join(f"{r[c]:.2f}x" if c in r else "-" for c in cols) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--tiny", action="store_true", help="tiny CPU sizes (also used when no CUDA is present)")
    ap.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192, 16384, 32768])
    ap.add_argument("--dims", type=int, nargs="+", default=[128, 64])
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--budget", type=float, default=200.0, help="seconds of timing before the rest is skipped")
    args = ap.parse_args(argv)
    gpu = torch.cuda.is_available() and not args.tiny
    meta = versions()
    if gpu:
        device, dtype, backend = "cuda", torch.bfloat16, "triton"
        baselines = [("cudnn", "CUDNN_ATTENTION"), ("flash", "FLASH_ATTENTION")]
        lengths, dims, heads, check_len = args.lengths, args.dims, args.heads, 1024
    else:
        device, dtype, backend = "cpu", torch.float32, "blocksparse"
        baselines = [("default", None)]
        lengths, dims, heads, check_len = [64], [16], 2, 32
    meta.update({"heads": heads, "dtype": str(dtype).replace("torch.", ""), "ours": backend})
    print(json.dumps(meta), flush=True)
    t0 = time.time()
    checks = [row for D in dims for row in check(device, dtype, check_len, D, backend)]
    rows = bench(device, dtype, lengths, dims, heads, backend, baselines, args.budget)
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"meta": meta, "checks": checks, "timings": rows, "seconds": time.time() - t0}
    (args.out / "bench_softmax_free.json").write_text(json.dumps(result, indent=1))
    (args.out / "bench_softmax_free.md").write_text(markdown(meta, checks, rows, baselines))
    print(f"wrote {args.out}/bench_softmax_free.{{json,md}} in {time.time() - t0:.0f} s")
    return 0 if all(c["ok"] for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
